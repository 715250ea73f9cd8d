"""Dataset layouts as downloaded -> split manifests: :func:`build_manifest` and the :data:`LAYOUTS` table.

Each layout walks folders (it never opens an image) and lists rows ``(path, label, dataset[, class])``
relative to a data root; records and their CSV live in ``manifest.py``. A file whose name a manifest cannot
hold is left out and recorded with the reason; errors name the missing or unexpected folder or file. The
layouts (CNNDetection, UniversalFakeDetect, Synthbuster, the authors' LDM setting, any folder tree) and the
details of the authors' loaders each follows: docs/data.md.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from ..names import DEFAULT_PARQUET_IMAGE_COLUMN, DEFAULT_PARQUET_LABEL_COLUMN, GENIMAGE_LABEL_FOLDERS
from .folder_walk import (
    LABEL_FOLDERS,
    join_relative,
    list_files,
    list_label_folder,
    list_real_and_fake,
    list_subfolders,
    require_folder,
    select_names,
    walk_images,
)
from .manifest import Manifest, ManifestError, ManifestRow, check_split_name, path_problem, printable_name
from .parquet import ParquetColumns, list_parquet_rows, parse_parquet_path

# Test-set folders whose published dataset name differs from the folder name.
GENERATOR_DATASET_NAMES = {"seeingdark": "sitd"}
UFD_DIFFUSION_FOLDER = "diffusion_datasets"
# The real folder each UFD diffusion set is scored against; every set not
# listed here uses UFD_DEFAULT_REAL_FOLDER.
UFD_REAL_FOLDER_OF_SET = {"guided": "imagenet"}
UFD_DEFAULT_REAL_FOLDER = "laion"
UFD_REAL_FOLDERS = ("imagenet", "laion")
# The LDM training set (latent_diffusion_trainingset/) and where its reals come from.
LDM_DATASET = "ldm"
LDM_LSUN_LIST = "real_lsun.txt"
LDM_COCO_LIST = "real_coco.txt"
LDM_LSUN_PART = "train"  # both LDM splits take their LSUN reals from ProGAN's *training* folders
_MISSING_EXAMPLES = 5


@dataclass(frozen=True)
class LayoutConfig:
    """What a layout may take besides its root; None = not given (all classes, all generators)."""

    classes: tuple[str, ...] | None = None
    generators: tuple[str, ...] | None = None
    raise_root: Path | None = None
    progan_root: Path | None = None
    coco_root: Path | None = None
    image_column: str | None = None  # parquet: None = names.DEFAULT_PARQUET_IMAGE_COLUMN
    label_column: str | None = None  # parquet: None = names.DEFAULT_PARQUET_LABEL_COLUMN
    generator_column: str | None = None  # parquet: None = every row's dataset is the root's folder name


# (root, options) -> (data root, rows) or (data root, rows, skipped (name, reason)) for layouts that skip rows
Walker = Callable[[Path, LayoutConfig], tuple]


@dataclass(frozen=True)
class Layout:
    """One on-disk layout: its walker, the options it accepts and those it needs."""

    name: str
    walk: Walker
    accepts: tuple[str, ...] = ()  # LayoutConfig fields it may be given
    needs: Mapping[str, str] = field(default_factory=dict)  # fields it must be given -> what they hold


def build_manifest(
    layout: str,
    root: Path,
    split: str,
    *,
    classes: Sequence[str] | None = None,
    generators: Sequence[str] | None = None,
    raise_root: Path | None = None,
    progan_root: Path | None = None,
    coco_root: Path | None = None,
    image_column: str | None = None,
    label_column: str | None = None,
    generator_column: str | None = None,
) -> Manifest:
    """List the images of a dataset as downloaded, following one of :data:`LAYOUTS`.

    ``root`` is the top folder of the dataset (see the module docstring for
    each layout). Rows are sorted by (path, dataset); the manifest records
    the layout and its options.

    Raises ValueError for options the layout does not take (or lacks) and
    ManifestError for data on disk that do not match the layout (naming the
    missing folder or file), for unknown requested classes/generators, and
    for a label folder without images (so a manifest is never empty).
    """
    check_split_name(split)
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout '{layout}' (known: {', '.join(LAYOUTS)})")
    spec = LAYOUTS[layout]
    options = LayoutConfig(
        classes=name_list("classes", classes),
        generators=name_list("generators", generators),
        raise_root=absolute(raise_root),
        progan_root=absolute(progan_root),
        coco_root=absolute(coco_root),
        image_column=image_column,
        label_column=label_column,
        generator_column=generator_column,
    )
    check_layout_options(spec, options)
    root = Path(root)
    if not root.is_dir():
        raise ManifestError(f"{root}: data root is not a folder")
    data_root, found, *walk_skipped = spec.walk(root.resolve(), options)
    rows, skipped = [], list(walk_skipped[0]) if walk_skipped else []
    for row in found:
        problem = getattr(row.path, "problem", None) or path_problem(row.path)
        if problem is None:
            rows.append(row)
        else:
            skipped.append((printable_name(row.path), problem))
    if not rows:
        raise ManifestError(f"{root}: no image with a usable name ({len(skipped)} skipped, e.g. {skipped[0][1]})")
    recorded = {key: str(value) if isinstance(value, Path) else value for key, value in asdict(options).items()}
    ordered = tuple(sorted(rows, key=row_order))
    return Manifest(
        split=split,
        rows=ordered,
        data_root=data_root,
        layout=layout,
        options={"root": str(root.resolve()), **recorded},
        skipped=tuple(sorted(set(skipped))),
    )


def row_order(row: ManifestRow) -> tuple[str, int, str]:
    """Rows by path then dataset; the rows of a Parquet file in their order in it (``#2`` before ``#10``)."""
    parsed = parse_parquet_path(row.path)
    return (row.path, -1, row.dataset) if parsed is None else (parsed[0], parsed[1], row.dataset)


def name_list(name: str, value: Sequence[str] | None) -> tuple[str, ...] | None:
    """The distinct names, sorted; None stays None (all)."""
    if value is None:
        return None
    if isinstance(value, str):
        raise ValueError(f"{name} must be a sequence of names, not the string {value!r}")
    if len(value) == 0:
        raise ValueError(f"{name} must not be empty (use None for all)")
    return tuple(sorted(set(value)))


def absolute(path: Path | None) -> Path | None:
    return None if path is None else Path(path).resolve()


def check_layout_options(layout: Layout, options: LayoutConfig) -> None:
    for option in fields(LayoutConfig):
        given = getattr(options, option.name) is not None
        if given and option.name not in (*layout.accepts, *layout.needs):
            raise ValueError(f"layout '{layout.name}' does not take {option.name}")
        if not given and option.name in layout.needs:
            raise ValueError(f"layout '{layout.name}' needs {option.name} ({layout.needs[option.name]})")


def list_cnndetection_training(root: Path, part: str, classes: Sequence[str] | None) -> list[ManifestRow]:
    expected = f"{part}/<class>/{{0_real,1_fake}}"
    part_folder = require_folder(root, part, expected)
    found = list_subfolders(part_folder)
    if not found:
        raise ManifestError(f"no class folders in {part_folder}: expected {expected}")
    rows: list[ManifestRow] = []
    for class_name in select_names(found, classes, "class", part_folder):
        rows += list_real_and_fake(root, f"{part}/{class_name}", "progan", class_name, expected)
    return rows


def list_cnndetection_test(root: Path, generators: Sequence[str] | None) -> list[ManifestRow]:
    expected = "test/<generator>/[<class>/]{0_real,1_fake}"
    test_folder = require_folder(root, "test", expected)
    folder_of_dataset = {
        GENERATOR_DATASET_NAMES.get(name, name): name
        for name in list_subfolders(test_folder)
        if name != UFD_DIFFUSION_FOLDER
    }
    if not folder_of_dataset:
        raise ManifestError(f"no generator folders in {test_folder}: expected {expected}")
    rows: list[ManifestRow] = []
    for dataset in select_names(sorted(folder_of_dataset), generators, "generator", test_folder):
        rows += list_test_generator(root, f"test/{folder_of_dataset[dataset]}", dataset, expected)
    return rows


def list_test_generator(root: Path, relative: str, dataset: str, expected: str) -> list[ManifestRow]:
    """One generator of the CNNDetection test set, with or without class folders."""
    subfolders = list_subfolders(root.joinpath(*relative.split("/")))
    label_folders = [name for name in subfolders if name in LABEL_FOLDERS]
    if label_folders:
        others = [name for name in subfolders if name not in LABEL_FOLDERS]
        if others:
            raise ManifestError(
                f"{root / relative}: mixes {'/'.join(label_folders)} with other folders "
                f"({', '.join(others)}): expected {expected}"
            )
        return list_real_and_fake(root, relative, dataset, None, expected)
    if not subfolders:
        raise ManifestError(f"no folder {relative}/0_real/ (nor class folders) under {root}: expected {expected}")
    rows: list[ManifestRow] = []
    for class_name in subfolders:
        rows += list_real_and_fake(root, f"{relative}/{class_name}", dataset, class_name, expected)
    return rows


def list_ufd_diffusion(root: Path, generators: Sequence[str] | None) -> list[ManifestRow]:
    base = f"test/{UFD_DIFFUSION_FOLDER}"
    expected = f"{base}/<set>/1_fake with reals in {base}/{{imagenet,laion}}/0_real"
    base_folder = require_folder(root, base, expected)
    sets = [name for name in list_subfolders(base_folder) if name not in UFD_REAL_FOLDERS]
    if not sets:
        raise ManifestError(f"no diffusion set folders in {base_folder}: expected {expected}")
    rows: list[ManifestRow] = []
    reals_of_folder: dict[str, list[str]] = {}
    for set_name in select_names(sets, generators, "diffusion set", base_folder):
        require_folder(root, f"{base}/{set_name}/1_fake", expected)
        rows += list_label_folder(root, f"{base}/{set_name}/1_fake", set_name, None)
        real_folder = UFD_REAL_FOLDER_OF_SET.get(set_name, UFD_DEFAULT_REAL_FOLDER)
        if real_folder not in reals_of_folder:
            relative = f"{base}/{real_folder}/0_real"
            require_folder(root, relative, f"the reals of '{set_name}' in {relative}/")
            reals_of_folder[real_folder] = [row.path for row in list_label_folder(root, relative, real_folder, None)]
        rows += [ManifestRow(path, 0, set_name) for path in reals_of_folder[real_folder]]
    return rows


def list_synthbuster(root: Path, raise_root: Path, generators: Sequence[str] | None) -> tuple[Path, list[ManifestRow]]:
    """(data root, rows): fakes under ``root``, reals directly in ``raise_root``."""
    if not raise_root.is_dir():
        raise ManifestError(f"{raise_root}: raise_root is not a folder (expected RAISE images, e.g. RAISEpng/*.png)")
    raise_root = raise_root.resolve()
    data_root = Path(os.path.commonpath([root, raise_root]))
    root_relative = root.relative_to(data_root).as_posix()
    raise_relative = raise_root.relative_to(data_root).as_posix()
    fakes_of_generator: dict[str, list[str]] = {}
    for name in list_subfolders(root):
        if (root / name).resolve() == raise_root:
            continue
        paths = list(walk_images(root / name, join_relative(root_relative, name), recursive=False))
        if paths:
            fakes_of_generator[name] = paths
    if not fakes_of_generator:
        raise ManifestError(f"no generator folders with images in {root}: expected <generator>/*.png")
    reals = list(walk_images(raise_root, raise_relative, recursive=False))
    if not reals:
        raise ManifestError(f"{raise_root}: no images directly in raise_root")
    rows: list[ManifestRow] = []
    chosen = select_names(sorted(fakes_of_generator), generators, "generator folder with images", root)
    for generator in chosen:
        rows += [ManifestRow(path, 1, generator) for path in fakes_of_generator[generator]]
        rows += [ManifestRow(path, 0, generator) for path in reals]
    return data_root, rows


def list_label_folders_anywhere(root: Path) -> list[ManifestRow]:
    """Rows of every ``0_real``/``1_fake`` folder at any depth under ``root``."""
    rows: list[ManifestRow] = []
    for relative in find_label_folders(root, "", frozenset()):
        parent = relative.rsplit("/", 1)[0] if "/" in relative else ""
        rows += list_label_folder(root, relative, parent or root.name, None)
    if not rows:
        raise ManifestError(f"no folder named 0_real/ or 1_fake/ under {root}")
    return rows


def find_label_folders(folder: Path, relative: str, ancestors: frozenset[tuple[int, int]]) -> Iterator[str]:
    """Relative paths of the label folders below ``folder`` (not descending into them)."""
    stat = folder.stat()
    ancestors = ancestors | {(stat.st_dev, stat.st_ino)}
    for name in list_subfolders(folder):
        name_relative = join_relative(relative, name)
        if name in LABEL_FOLDERS:
            yield name_relative
            continue
        target = (folder / name).stat()
        if (target.st_dev, target.st_ino) in ancestors:
            raise ManifestError(f"{folder / name}: symbolic link loop back to a parent folder")
        yield from find_label_folders(folder / name, name_relative, ancestors)


def list_ldm_training(root: Path, part: str, progan_root: Path, coco_root: Path) -> tuple[Path, list[ManifestRow]]:
    """(data root, rows) of one split of the LDM training set, exactly as the authors' loader lists it.

    Facts from the authors' code (``TrainingDatasetLDM(split)`` in
    ``src/data.py``, used by ``scripts/diffusion.py`` with split ``train``
    for training and ``valid`` for validation; ``root`` is their
    ``data/latent_diffusion_trainingset``, ``progan_root`` their ``data``
    holding CNNDetection's ``train/``, ``coco_root`` their ``data/coco``):

    - fakes (label 1): every file in every folder directly inside
      ``root/<part>/`` (``part`` = ``train`` or ``valid``), whatever its
      extension (their loader takes every entry; hidden files are skipped
      here as in every layout, and a folder below is an error);
    - LSUN reals (label 0): one name per line of ``root/<part>/real_lsun.txt``,
      ``<class>_<file>``, read from ``progan_root/train/<class>/0_real/<file>``
      -- the ProGAN *training* folders for both splits. Their code takes the
      fields around the first '_' (``split('_')[0]`` and ``[1]``), so a name
      with a further '_' could not load there; here the file is everything
      after the first '_';
    - COCO reals (label 0): one name ``x`` per line of
      ``root/<part>/real_coco.txt``, read from
      ``coco_root/train2014/COCO_train2014_<x>`` when that file exists,
      else ``coco_root/val2014/COCO_val2014_<x>`` (COCO 2014 train or val);
    - blank lines of the lists are ignored (as ``pandas.read_csv`` does);
      a listed file that does not exist, a name listed twice and an LSUN name
      without '_' are errors naming the list and line.

    Every row's dataset is ``ldm``. The data root is the deepest common
    parent of the three roots.
    """
    progan_root = require_root(progan_root, "progan_root")
    coco_root = require_root(coco_root, "coco_root")
    data_root = Path(os.path.commonpath([root, progan_root, coco_root]))
    split_folder = require_folder(
        root, part, f"{part}/<folder>/* fakes, {part}/{LDM_LSUN_LIST} and {part}/{LDM_COCO_LIST}"
    )
    fakes = [
        (root / part / name / file).relative_to(data_root).as_posix()
        for name in list_subfolders(split_folder)
        for file in list_files(split_folder / name)
    ]
    if not fakes:
        raise ManifestError(
            f"{split_folder}: no files in any of its folders (expected the LDM fakes in {part}/<folder>/)"
        )
    reals: list[Path] = []
    for line, name in read_name_list(split_folder / LDM_LSUN_LIST):
        class_name, underscore, file = name.partition("_")
        if not underscore or not class_name or not file:
            raise ManifestError(f"{split_folder / LDM_LSUN_LIST} line {line}: expected <class>_<file>, got {name!r}")
        reals.append(progan_root / LDM_LSUN_PART / class_name / "0_real" / file)
    for _, name in read_name_list(split_folder / LDM_COCO_LIST):
        reals.append(coco_image(coco_root, name))
    check_listed_files(reals, split_folder)
    rows = [ManifestRow(path, 1, LDM_DATASET) for path in fakes]
    rows += [ManifestRow(path.relative_to(data_root).as_posix(), 0, LDM_DATASET) for path in reals]
    return data_root, rows


def require_root(path: Path, option: str) -> Path:
    if not Path(path).is_dir():
        raise ManifestError(f"{path}: {option} is not a folder (expected {_LDM_ROOTS[option]})")
    return Path(path).resolve()


def coco_image(coco_root: Path, name: str) -> Path:
    """``train2014/COCO_train2014_<name>`` when that file exists, else ``val2014/COCO_val2014_<name>`` (the authors' rule)."""
    train = coco_root / "train2014" / f"COCO_train2014_{name}"
    return train if train.is_file() else coco_root / "val2014" / f"COCO_val2014_{name}"


def read_name_list(path: Path) -> list[tuple[int, str]]:
    """(line number, name) of the non-blank lines of a text file listing files."""
    if not path.is_file():
        raise ManifestError(f"{path}: no such file (the list of real images of this split)")
    lines = path.read_text(encoding="utf-8").splitlines()
    return [(number, line) for number, line in enumerate(lines, start=1) if line.strip()]


def check_listed_files(paths: Sequence[Path], split_folder: Path) -> None:
    """Every listed real image exists, once."""
    missing = [path for path in paths if not path.is_file()]
    if missing:
        examples = "\n  ".join(str(path) for path in missing[:_MISSING_EXAMPLES])
        more = f"\n  ... and {len(missing) - _MISSING_EXAMPLES} more" if len(missing) > _MISSING_EXAMPLES else ""
        raise ManifestError(
            f"{len(missing)} real images listed in {split_folder}/{{{LDM_LSUN_LIST},{LDM_COCO_LIST}}} "
            f"do not exist:\n  {examples}{more}"
        )
    seen: set[Path] = set()
    for path in paths:
        if path in seen:
            raise ManifestError(f"{path}: listed twice in {split_folder}/{{{LDM_LSUN_LIST},{LDM_COCO_LIST}}}")
        seen.add(path)


def list_genimage(root: Path, part: str, generators: Sequence[str] | None) -> list[ManifestRow]:
    """GenImage's ``<generator>/[<subset>/]<part>/{ai,nature}/`` (the released archives add one subset folder,
    e.g. ``Midjourney/imagenet_midjourney/train/ai``); dataset = the generator folder's name."""
    expected = f"<generator>/[<subset>/]{part}/{{ai,nature}}"
    found = list_subfolders(root)
    if not found:
        raise ManifestError(f"no generator folders in {root}: expected {expected}")
    rows: list[ManifestRow] = []
    for generator in select_names(found, generators, "generator", root):
        relative = genimage_part(root, generator, part, expected)
        for folder, label in GENIMAGE_LABEL_FOLDERS.items():
            require_folder(root, f"{relative}/{folder}", expected)
            paths = list(
                walk_images(root.joinpath(*relative.split("/"), folder), f"{relative}/{folder}", recursive=True)
            )
            if not paths:
                raise ManifestError(f"{root / relative / folder}: no images in this {folder}/ folder")
            rows += [ManifestRow(path, label, generator) for path in paths]
    return rows


def genimage_part(root: Path, generator: str, part: str, expected: str) -> str:
    """``generator/part``, or ``generator/<subset>/part`` when one subset folder holds it."""
    if (root / generator / part).is_dir():
        return f"{generator}/{part}"
    holders = [name for name in list_subfolders(root / generator) if (root / generator / name / part).is_dir()]
    if len(holders) != 1:
        found = "none" if not holders else ", ".join(holders)
        raise ManifestError(
            f"{root / generator}: expected one {part}/ folder directly or in one subset folder ({expected}), "
            f"found {found}"
        )
    return f"{generator}/{holders[0]}/{part}"


def list_parquet(root: Path, options: LayoutConfig) -> tuple[Path, list[ManifestRow], list[tuple[str, str]]]:
    columns = ParquetColumns(
        image=options.image_column or DEFAULT_PARQUET_IMAGE_COLUMN,
        label=options.label_column or DEFAULT_PARQUET_LABEL_COLUMN,
        generator=options.generator_column,
    )
    rows, skipped = list_parquet_rows(root, columns, options.generators)
    return root, rows, skipped


# ---------------------------------------------------------------- the table

_CLASSES = ("classes",)
_GENERATORS = ("generators",)
_LDM_ROOTS = {
    "progan_root": "CNNDetection's root, whose train/<class>/0_real/ hold the LSUN reals",
    "coco_root": "COCO's root, holding train2014/ and val2014/",
}


def _rooted(list_rows: Callable[[Path, LayoutConfig], list[ManifestRow]]) -> Walker:
    """A walker whose data root is its root."""
    return lambda root, options: (root, list_rows(root, options))


LAYOUTS: dict[str, Layout] = {
    layout.name: layout
    for layout in (
        Layout(
            "cnndetection-train",
            _rooted(lambda root, o: list_cnndetection_training(root, "train", o.classes)),
            _CLASSES,
        ),
        Layout(
            "cnndetection-val", _rooted(lambda root, o: list_cnndetection_training(root, "val", o.classes)), _CLASSES
        ),
        Layout("cnndetection-test", _rooted(lambda root, o: list_cnndetection_test(root, o.generators)), _GENERATORS),
        Layout("ufd-diffusion", _rooted(lambda root, o: list_ufd_diffusion(root, o.generators)), _GENERATORS),
        Layout(
            "synthbuster",
            lambda root, o: list_synthbuster(root, o.raise_root, o.generators),
            _GENERATORS,
            {"raise_root": "the folder of RAISE real images"},
        ),
        Layout(
            "ldm-train", lambda root, o: list_ldm_training(root, "train", o.progan_root, o.coco_root), needs=_LDM_ROOTS
        ),
        Layout(
            "ldm-val", lambda root, o: list_ldm_training(root, "valid", o.progan_root, o.coco_root), needs=_LDM_ROOTS
        ),
        Layout("genimage-train", _rooted(lambda root, o: list_genimage(root, "train", o.generators)), _GENERATORS),
        Layout("genimage-val", _rooted(lambda root, o: list_genimage(root, "val", o.generators)), _GENERATORS),
        Layout("parquet", list_parquet, (*_GENERATORS, "image_column", "label_column", "generator_column")),
        Layout("folder", _rooted(lambda root, o: list_label_folders_anywhere(root))),
    )
}
