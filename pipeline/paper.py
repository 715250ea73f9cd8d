"""Paper mode: every experiment of the paper on the real data, planned from the grid files.

``pipeline paper DATA_ROOT`` checks the layout (:func:`check_data`; Synthbuster and the LDM set optional),
plans (:func:`plan_paper`: the grids whose backbone and data are present; the extractions they need, with as
many training views as the largest ``epochs``), then writes the manifests (exactly the paper's 20 test sets),
extracts, fits and reports, each step resumable. docs/reproduction.md.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from . import cache
from .errors import PipelineError
from .features import manifest_path, read_manifest, write_manifest
from .features.layouts import GENERATOR_DATASET_NAMES, LAYOUTS, UFD_REAL_FOLDERS, build_manifest
from .names import CENTER, PAPER_BACKBONES
from .variants import VariantGroup

if TYPE_CHECKING:  # stage two and the backbone load only when a step runs (`pipeline --help` stays fast)
    from .features import ExtractConfig, ExtractSummary
    from .heads import GridConfig, GridSummary, StoreRef

TRAIN_CLASSES = ("car", "cat", "chair", "horse")
# The paper's 20 test sets, as folders of the download.
GAN_TEST_FOLDERS = (
    "progan",
    "stylegan",
    "stylegan2",
    "biggan",
    "cyclegan",
    "stargan",
    "gaugan",
    "deepfake",
    "seeingdark",
    "san",
    "crn",
    "imle",
)
DIFFUSION_TEST_SETS = (
    "guided",
    "ldm_200",
    "ldm_200_cfg",
    "ldm_100",
    "glide_100_27",
    "glide_50_27",
    "glide_100_10",
    "dalle",
)
# The generators of Synthbuster the authors evaluate (src/utils.py get_generators("synthbuster")).
SYNTHBUSTER_GENERATORS = (
    "dalle2",
    "dalle3",
    "stable-diffusion-1-3",
    "stable-diffusion-1-4",
    "stable-diffusion-2",
    "stable-diffusion-xl",
    "glide",
    "firefly",
    "midjourney-v5",
)
DEFAULT_GRID_FILE = Path("grid.yaml")
DEFAULT_GRID_DIR = Path("grids")
DEMO_GRID = "demo.yaml"


class PaperError(PipelineError):
    """The data, the grid files or the options do not allow a paper run."""


@dataclass(frozen=True)
class SplitSource:
    """How paper mode builds one split's manifest from DATA_ROOT.

    ``folders`` (relative to DATA_ROOT) must all exist. An optional source is
    absent when its first folder is; present, all its folders must exist.
    """

    split: str
    layout: str
    folders: tuple[str, ...]
    root: str = "."  # the layout's --root, relative to DATA_ROOT
    classes: tuple[str, ...] | None = None
    generators: tuple[str, ...] | None = None  # dataset names the manifest keeps
    path_options: Mapping[str, str] = field(default_factory=dict)  # e.g. raise_root, relative to DATA_ROOT
    optional: str | None = None  # what the optional data set is called, for messages

    def missing(self, data_root: Path) -> list[str]:
        return [f"{folder}/" for folder in self.folders if not (data_root / folder).is_dir()]

    def is_absent(self, data_root: Path) -> bool:
        """An optional data set without its first folder is absent (its grids are skipped)."""
        return self.optional is not None and not (data_root / self.folders[0]).is_dir()


def _training_folders(part: str) -> tuple[str, ...]:
    return tuple(f"{part}/{c}/{label}" for c in TRAIN_CLASSES for label in ("0_real", "1_fake"))


def _ldm_training_split(split: str, layout: str, part: str) -> SplitSource:
    """The LDM training setting (scripts/diffusion.py): fakes under latent_diffusion_trainingset/<part>/,
    reals listed there and read from CNNDetection's train/<class>/0_real/ and from COCO 2014."""
    return SplitSource(
        split,
        layout,
        (f"latent_diffusion_trainingset/{part}", "coco"),
        root="latent_diffusion_trainingset",
        path_options={"progan_root": ".", "coco_root": "coco"},
        optional="the LDM training set (latent_diffusion_trainingset/ and coco/)",
    )


SPLITS: dict[str, SplitSource] = {
    source.split: source
    for source in (
        SplitSource("train_4class", "cnndetection-train", _training_folders("train"), classes=TRAIN_CLASSES),
        SplitSource("val_4class", "cnndetection-val", _training_folders("val"), classes=TRAIN_CLASSES),
        SplitSource(
            "test_gan",
            "cnndetection-test",
            tuple(f"test/{folder}" for folder in GAN_TEST_FOLDERS),
            generators=tuple(GENERATOR_DATASET_NAMES.get(folder, folder) for folder in GAN_TEST_FOLDERS),
        ),
        SplitSource(
            "test_diffusion",
            "ufd-diffusion",
            tuple(f"test/diffusion_datasets/{s}/1_fake" for s in DIFFUSION_TEST_SETS)
            + tuple(f"test/diffusion_datasets/{r}/0_real" for r in UFD_REAL_FOLDERS),
            generators=DIFFUSION_TEST_SETS,
        ),
        SplitSource(
            "synthbuster",
            "synthbuster",
            ("synthbuster", "RAISEpng") + tuple(f"synthbuster/{g}" for g in SYNTHBUSTER_GENERATORS),
            root="synthbuster",
            generators=SYNTHBUSTER_GENERATORS,
            path_options={"raise_root": "RAISEpng"},
            optional="Synthbuster (synthbuster/<generator>/ and the RAISE reals in RAISEpng/)",
        ),
        _ldm_training_split("train_ldm", "ldm-train", "train"),
        _ldm_training_split("val_ldm", "ldm-val", "valid"),
    )
}

EXPECTED_LAYOUT = """\
expected under DATA_ROOT (CNNDetection + UniversalFakeDetect diffusion sets):
  train/<class>/{0_real,1_fake}/         for car, cat, chair, horse
  val/<class>/{0_real,1_fake}/           for the same classes
  test/<generator>/[<class>/]{0_real,1_fake}/
                                         progan stylegan stylegan2 biggan cyclegan stargan gaugan
                                         deepfake seeingdark san crn imle
  test/diffusion_datasets/<set>/1_fake/  guided ldm_200 ldm_200_cfg ldm_100 glide_100_27
                                         glide_50_27 glide_100_10 dalle
  test/diffusion_datasets/{imagenet,laion}/0_real/
optional:
  synthbuster/<generator>/ and RAISEpng/ (Synthbuster, evaluated by ten crops)
  latent_diffusion_trainingset/{train,valid}/ and coco/ (the LDM training setting)"""


@dataclass(frozen=True)
class PaperConfig:
    """What `pipeline paper` runs; paths other than data_root are relative to the working directory."""

    data_root: Path
    backbones: tuple[str, ...] = PAPER_BACKBONES
    grid_files: tuple[Path, ...] | None = None  # None: grid.yaml and grids/*.yaml except the demo's
    manifests_dir: Path = Path("manifests")
    reports_dir: Path = Path("reports")
    device: str = "auto"
    batch_size: int = 32  # backbone batch of the extractions
    jobs: int = 1  # configs fitted in parallel
    plots: bool = True  # the report's figures besides its tables
    dry_run: bool = False  # check and plan only
    progress: bool = True


@dataclass(frozen=True)
class DataCheck:
    """Which splits DATA_ROOT can provide."""

    data_root: Path
    present: frozenset[str]
    absent: Mapping[str, str]  # split -> why (an optional data set that is not there)


@dataclass(frozen=True)
class ExtractJob:
    """One `pipeline extract` call: one split, one variant group, the taps that want it."""

    model: str
    cache_dir: Path
    split: str
    group: VariantGroup  # a training group counts its views in ``views``
    taps: tuple[str, ...]
    views: int = 1  # augmented views (training group)

    @property
    def variant_group(self) -> VariantGroup:
        return VariantGroup.views(self.views) if self.group.is_training else self.group

    def describe(self) -> str:
        return f"{self.split} ({self.variant_group.describe()}; {self.model}, tap {'+'.join(self.taps)})"

    def extract_config(self, config: PaperConfig) -> ExtractConfig:
        """The `pipeline extract` configuration of this job."""
        from .features import BackboneConfig, ExtractConfig

        return ExtractConfig(
            split=self.split,
            manifest=manifest_path(config.manifests_dir, self.split),
            backbone=BackboneConfig(model=self.model, device=config.device),
            taps=self.taps,
            cache_dir=self.cache_dir,
            batch_size=config.batch_size,
            variant_group=self.variant_group,
            progress=config.progress,
        )


@dataclass(frozen=True)
class GridPlan:
    path: Path
    spec: GridConfig | None  # None when skipped
    skip_reason: str = ""


@dataclass(frozen=True)
class PaperPlan:
    manifests: tuple[SplitSource, ...]
    extractions: tuple[ExtractJob, ...]
    grids: tuple[GridPlan, ...]
    notes: tuple[str, ...]  # why the training splits get as many views as they do

    @property
    def fits(self) -> tuple[GridConfig, ...]:
        return tuple(g.spec for g in self.grids if g.spec is not None)

    def describe(self) -> str:
        lines = ["manifests: " + (", ".join(s.split for s in self.manifests) or "none")]
        lines += ["extractions:"] + [f"  {job.describe()}" for job in self.extractions]
        lines += list(self.notes)
        lines += ["grids:"] + [
            f"  fit  {g.path} -> {g.spec.out} ({len(g.spec)} configs)"
            if g.spec
            else f"  skip {g.path}: {g.skip_reason}"
            for g in self.grids
        ]
        return "\n".join(lines)


@dataclass(frozen=True)
class PaperSummary:
    plan: PaperPlan
    n_failed_runs: int
    reports_dir: Path | None  # None: nothing was fitted, so nothing reported


# ---------------------------------------------------------------- checking and planning


def check_data(data_root: Path) -> DataCheck:
    """Which splits DATA_ROOT holds; PaperError listing every missing folder of a needed data set."""
    data_root = Path(data_root)
    if not data_root.is_dir():
        raise PaperError(f"DATA_ROOT {data_root} is not a folder")
    missing: list[str] = []
    absent: dict[str, str] = {}
    for source in SPLITS.values():
        if source.is_absent(data_root):
            absent[source.split] = f"{source.optional} is absent under {data_root}"
        elif source.layout not in LAYOUTS:
            absent[source.split] = f"this version has no manifest layout {source.layout!r} for {source.optional}"
        else:
            missing += [m for m in source.missing(data_root) if m not in missing]
    if missing:
        raise PaperError(
            f"{data_root} does not have the expected layout; missing:\n"
            + "".join(f"  {m}\n" for m in missing)
            + EXPECTED_LAYOUT
        )
    return DataCheck(data_root, frozenset(SPLITS) - frozenset(absent), absent)


def default_grid_files() -> tuple[Path, ...]:
    """grid.yaml and grids/*.yaml (the demo's excepted), relative to the working directory."""
    found = ([DEFAULT_GRID_FILE] if DEFAULT_GRID_FILE.is_file() else []) + sorted(
        p for p in DEFAULT_GRID_DIR.glob("*.yaml") if p.name != DEMO_GRID
    )
    if not found:
        raise PaperError(
            f"no grid files in {Path.cwd()} ({DEFAULT_GRID_FILE}, {DEFAULT_GRID_DIR}/*.yaml): "
            f"run from the repository root or pass --grids"
        )
    return tuple(found)


def ref_cache_dir(spec: GridConfig, ref: StoreRef) -> Path | None:
    """The cache folder a split reference resolves in, or None for a store given by path."""
    if len(ref.path.parents) < 3:
        return None
    cache_dir = ref.path.parents[2]
    return cache_dir if cache.default_store_path(cache_dir, spec.model, spec.tap, ref.path.stem) == ref.path else None


def evaluation_group(variant: str | None) -> VariantGroup | None:
    """The group an evaluation entry's variant asks for; None when paper mode cannot extract it."""
    try:
        return VariantGroup.from_name(variant or CENTER)
    except ValueError:
        return None


def grid_skip_reason(spec: GridConfig, backbones: tuple[str, ...], data: DataCheck) -> str:
    """Why paper mode cannot run this grid, or "" when it can."""
    if spec.model not in backbones:
        return f"its backbone {spec.model} is not among the selected backbones ({', '.join(backbones)})"
    if spec.train.variant is not None:
        return f"its train entry asks for variant {spec.train.variant!r}; paper mode extracts training splits as augmented views"
    for ref in (spec.train, spec.val, *spec.tests):
        split = ref.path.stem
        if ref_cache_dir(spec, ref) is None:
            return f"it names a store by path ({ref.path}); paper mode builds stores by split name"
        if split not in SPLITS:
            return f"it reads split {split!r}, which paper mode does not build (it builds {', '.join(SPLITS)})"
        if split in data.absent:
            return f"it reads split {split!r}: {data.absent[split]}"
        if ref is not spec.train and evaluation_group(ref.variant) is None:
            return f"its entry {ref.name!r} asks for variant {ref.variant!r}, which paper mode cannot extract"
    return ""


def plan_paper(config: PaperConfig, data: DataCheck) -> PaperPlan:
    """Which grids run, and the manifests and extractions they need (see the module docstring)."""
    from .heads import ConfigError, load_grid

    grids: list[GridPlan] = []
    for path in config.grid_files or default_grid_files():
        try:
            spec = load_grid(path)
        except ConfigError as error:
            raise PaperError(f"grid file {error}") from None
        reason = grid_skip_reason(spec, config.backbones, data)
        grids.append(GridPlan(path, None if reason else spec, reason))
    fits = [g.spec for g in grids if g.spec is not None]

    # (model, cache folder, split, group) -> {tap: views}; (model, split, tap) -> (views, the grids asking that many)
    wanted: dict[tuple[str, Path, str, VariantGroup], dict[str, int]] = {}
    largest: dict[tuple[str, str, str], tuple[int, list[str]]] = {}
    for spec in fits:
        for ref in (spec.train, spec.val, *spec.tests):
            training = ref is spec.train
            group = VariantGroup.views(1) if training else evaluation_group(ref.variant)
            views = max(run.epochs for run in spec.runs) if training else 1
            taps = wanted.setdefault((spec.model, ref_cache_dir(spec, ref), ref.path.stem, group), {})
            taps[spec.tap] = max(taps.get(spec.tap, 1), views)
            if training:
                key, name = (spec.model, ref.path.stem, spec.tap), str(spec.source or spec.name)
                most, names = largest.get(key, (0, []))
                if views > most:
                    largest[key] = (views, [name])
                elif views == most:
                    names.append(name)

    extractions: list[ExtractJob] = []
    split_order = list(SPLITS)
    for (model, cache_dir, split, group), taps in sorted(
        wanted.items(),
        key=lambda item: (item[0][0], split_order.index(item[0][2]), not item[0][3].is_training, item[0][3].name),
    ):
        # Fewest views first, with every tap that wants at least that many: each view is
        # computed by one forward pass, and no tap stores more views than its grids read.
        for level in sorted(set(taps.values())):
            extractions.append(
                ExtractJob(model, cache_dir, split, group, tuple(t for t in taps if taps[t] >= level), level)
            )
    notes = tuple(
        f"{split} ({model}, tap {tap}): {views} augmented view(s), the largest `epochs` of {', '.join(names)} "
        f"(a fresh augmentation every epoch)"
        for (model, split, tap), (views, names) in largest.items()
    )
    needed = {job.split for job in extractions}
    manifests = tuple(source for name, source in SPLITS.items() if name in needed)
    return PaperPlan(manifests, tuple(extractions), tuple(grids), notes)


# ---------------------------------------------------------------- running


def run_paper(config: PaperConfig, log: Callable[[str], None] = print) -> PaperSummary:
    """Check, plan, then build the manifests, extract, fit and report; ``log`` receives progress lines."""
    data = check_data(config.data_root)
    for split, reason in data.absent.items():
        log(f"optional split {split} not planned: {reason}")
    plan = plan_paper(config, data)
    log(plan.describe())
    if config.dry_run:
        return PaperSummary(plan, 0, None)
    for source in plan.manifests:
        log(f"==> manifest {source.split}")
        write_split_manifest(source, data.data_root, config.manifests_dir, log)
    for job in plan.extractions:
        extract_config = job.extract_config(config)
        if stores_are_complete(extract_config):
            log(f"==> extract {job.describe()}: already complete")
            continue
        log(f"==> extract {job.describe()}")
        log(extract(extract_config).report())
    n_failed = 0
    for spec in plan.fits:
        log(f"==> fit {spec.source} -> {spec.out}")
        summary = fit(spec, config)
        log(
            f"{summary.n_runs} runs ({summary.n_skipped} already done, {summary.n_errors} failed) in {summary.seconds:.1f} s"
        )
        n_failed += summary.n_errors
    if not plan.fits:
        log(f"no grid runs with the backbones {', '.join(config.backbones)}: nothing to fit or report")
        return PaperSummary(plan, n_failed, None)
    from .report import ReportConfig, run_report

    log(f"==> report {config.reports_dir}")
    outs = tuple(spec.out for spec in plan.fits)
    report = ReportConfig(grid_dirs=outs, out=config.reports_dir, plots=config.plots, progress=config.progress)
    log(run_report(report).report())
    return PaperSummary(plan, n_failed, config.reports_dir)


def write_split_manifest(
    source: SplitSource,
    data_root: Path,
    manifests_dir: Path,
    log: Callable[[str], None],
) -> None:
    manifest = build_manifest(
        source.layout,
        data_root / source.root,
        source.split,
        classes=source.classes,
        generators=source.generators,
        **{name: data_root / relative for name, relative in source.path_options.items()},
    )
    path = manifest_path(manifests_dir, source.split)
    write_manifest(manifest, path)
    log(f"{path}: {len(manifest)} images in {len({row.dataset for row in manifest.rows})} dataset(s)")


def stores_are_complete(config: ExtractConfig) -> bool:
    """Every tap's store holds every variant of ``config``, complete, for its manifest (no backbone to load)."""
    from .features import store_path

    manifest_sha256 = read_manifest(config.manifest).sha256()
    wanted = {variant.name for variant in config.variants()}
    for tap in config.taps:
        try:
            info = cache.open_store_info(store_path(config, tap))
        except cache.StoreError:
            return False
        if info.identity.manifest_sha256 != manifest_sha256 or wanted - set(info.complete_variants):
            return False
    return True


def extract(config: ExtractConfig) -> ExtractSummary:
    from .features import run_extract

    return run_extract(config)


def fit(spec: GridConfig, config: PaperConfig) -> GridSummary:
    from .heads import FitConfig, run_grid

    return run_grid(
        spec,
        FitConfig(device=config.device, jobs=config.jobs, progress=config.progress),
    )
