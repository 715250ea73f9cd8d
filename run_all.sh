#!/usr/bin/env bash
# One-command runs of the RINE pipeline.
#
#   ./run_all.sh demo                 the whole chain on built-in synthetic data (CPU, a few minutes)
#   ./run_all.sh test [PYTEST ARGS]   the test suite
#   ./run_all.sh paper DATA_ROOT [--backbones ID[,ID...]]
#                                     the paper's experiments on the real data (GPU machine)
#
# Every mode first creates (or reuses) the virtualenv .venv next to this script
# with the python3 found on PATH. Every step is resumable: running the same
# command again skips what is already finished.
#
# Environment:
#   TORCH_SPEC  pip arguments that install torch when the venv has none
#               (default "torch==2.13.0"; e.g. "torch==2.13.0 --index-url URL" for a CUDA build)
#   VIEWS       augmented views of the training split extracted in paper mode (default 1;
#               epoch e of a run reads view e mod VIEWS; all views are loaded in memory to fit)
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="$REPO/.venv"
STAMP="$VENV/.run_all-installed"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
DEFAULT_BACKBONES="openai/clip-vit-large-patch14,openai/clip-vit-base-patch32"
TRAIN_CLASSES="car,cat,chair,horse"
GAN_TEST_FOLDERS="progan stylegan stylegan2 biggan cyclegan stargan gaugan deepfake seeingdark san crn imle"
DIFFUSION_SETS="guided ldm_200 ldm_200_cfg ldm_100 glide_100_27 glide_50_27 glide_100_10 dalle"

usage() {
    cat <<'EOF'
usage: ./run_all.sh demo
       ./run_all.sh test [PYTEST ARGS...]
       ./run_all.sh paper DATA_ROOT [--backbones ID[,ID...]]

  demo    builds a small synthetic data set and a tiny random-weight CLIP under demo/,
          then manifest -> extract -> fit (grids/demo.yaml) -> report into demo/reports.
          It shows the pipeline working, not detection quality.
  test    runs the test suite: python -m pytest -q
  paper   the paper's experiments on the real data under DATA_ROOT (needs a GPU and the
          Hugging Face hub or its cache): CNNDetection train/ val/ test/ and the
          UniversalFakeDetect sets in test/diffusion_datasets/. Backbones default to
          openai/clip-vit-large-patch14,openai/clip-vit-base-patch32.

Environment: TORCH_SPEC (pip arguments for torch, default torch==2.13.0), VIEWS (paper mode).
EOF
}

step() {
    printf '\n==> [%d s] %s\n' "$SECONDS" "$*"
}

setup_checksum() {
    cat "$REPO/setup.cfg" "$REPO/pyproject.toml" | sha256sum | cut -d' ' -f1
}

setup_venv() {
    if [[ ! -x "$VENV/bin/python" ]]; then
        step "creating the virtualenv .venv with $(command -v python3) ($(python3 --version 2>&1))"
        python3 -m venv "$VENV"
    fi
    if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$(setup_checksum)" ]]; then
        return
    fi
    if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
        step "installing torch into .venv: pip install $TORCH_SPEC"
        local torch_args
        read -r -a torch_args <<<"$TORCH_SPEC"
        "$VENV/bin/python" -m pip install -qq "${torch_args[@]}"
    fi
    step "installing the pipeline into .venv: pip install -e '.[test]'"
    "$VENV/bin/python" -m pip install -qq -e ".[test]"
    setup_checksum >"$STAMP"
}

run_pipeline() {
    echo "+ pipeline $*"
    "$VENV/bin/pipeline" "$@"
}

# ---------------------------------------------------------------- demo

demo_banner() {
    cat <<'EOF'
==========================================================================
 RINE pipeline demo
 The backbone is a tiny CLIP with RANDOM weights and the images are
 SYNTHETIC (procedural textures; the "fakes" carry up-sampling traces).
 It shows the pipeline working end to end: manifest -> extract -> fit ->
 report. Its numbers say nothing about how well RINE detects real
 generated images; for that: ./run_all.sh paper DATA_ROOT
==========================================================================
EOF
}

run_demo() {
    demo_banner
    setup_venv
    export HF_HUB_OFFLINE=1
    # The demo's models are tiny: one torch thread is as fast, and it does not
    # collapse when other processes share the CPU.
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
    step "building the demo data (demo/data) and the random backbone (demo/tiny-random-clip)"
    "$VENV/bin/python" -m pipeline.demo --root demo/data --backbone demo/tiny-random-clip
    step "manifests (demo/manifests)"
    local split
    for split in train val test; do
        run_pipeline manifest --layout folder --root "demo/data/$split" --split "$split" --manifests-dir demo/manifests
    done
    step "features of the random backbone (demo/cache)"
    run_pipeline extract --split train --manifest demo/manifests/train.csv --model demo/tiny-random-clip \
        --cache-dir demo/cache --views 2 --no-progress
    for split in val test; do
        run_pipeline extract --split "$split" --manifest "demo/manifests/$split.csv" --model demo/tiny-random-clip \
            --cache-dir demo/cache --no-progress
    done
    step "fitting the heads of grids/demo.yaml (demo/runs/demo)"
    run_pipeline fit --grid grids/demo.yaml
    step "report (demo/reports)"
    run_pipeline report --out demo/reports demo/runs/demo
    step "done"
    echo "results, one row per run x dataset: demo/runs/demo/results.csv"
    echo "best configs:                       demo/runs/demo/selection.csv"
    echo "tables and plots:                   demo/reports/"
    ls demo/reports
    echo "(random backbone and synthetic data: these numbers show the pipeline working, not detection quality)"
}

# ---------------------------------------------------------------- paper

# Prints every folder of the expected layout that DATA_ROOT lacks.
missing_paper_folders() {
    local root=$1 part class label folder set real
    for part in train val; do
        for class in ${TRAIN_CLASSES//,/ }; do
            for label in 0_real 1_fake; do
                [[ -d "$root/$part/$class/$label" ]] || echo "$part/$class/$label/"
            done
        done
    done
    for folder in $GAN_TEST_FOLDERS; do
        [[ -d "$root/test/$folder" ]] || echo "test/$folder/"
    done
    for set in $DIFFUSION_SETS; do
        [[ -d "$root/test/diffusion_datasets/$set/1_fake" ]] || echo "test/diffusion_datasets/$set/1_fake/"
    done
    for real in imagenet laion; do
        [[ -d "$root/test/diffusion_datasets/$real/0_real" ]] || echo "test/diffusion_datasets/$real/0_real/"
    done
}

check_paper_layout() {
    local root=$1 missing
    if [[ ! -d "$root" ]]; then
        echo "error: DATA_ROOT $root is not a folder" >&2
        exit 1
    fi
    mapfile -t missing < <(missing_paper_folders "$root")
    if [[ ${#missing[@]} -gt 0 ]]; then
        {
            echo "error: $root does not have the expected layout; missing:"
            printf '  %s\n' "${missing[@]}"
            cat <<'EOF'
expected (CNNDetection + UniversalFakeDetect diffusion sets):
  train/<class>/{0_real,1_fake}/         for car, cat, chair, horse
  val/<class>/{0_real,1_fake}/           for the same classes
  test/<generator>/[<class>/]{0_real,1_fake}/
                                         progan stylegan stylegan2 biggan cyclegan stargan gaugan
                                         deepfake seeingdark san crn imle
  test/diffusion_datasets/<set>/1_fake/  guided ldm_200 ldm_200_cfg ldm_100 glide_100_27
                                         glide_50_27 glide_100_10 dalle
  test/diffusion_datasets/{imagenet,laion}/0_real/
EOF
        } >&2
        exit 1
    fi
}

# Prints the work the grid files ask for, one tab-separated line each:
#   extract <model> <split> <variant> <taps>  for every backbone (the four standard splits, ln2) and
#                                             every split/variant a grid of that backbone names, with
#                                             the comma list of taps wanted (one forward pass for all)
#   fit <grid file> <output folder>           for every grid whose backbone is selected
#   skip <grid file> <model>                  for the others
plan_paper_work() {
    "$VENV/bin/python" - "$@" <<'EOF'
import sys
from pathlib import Path

from pipeline.config import ConfigError, load_grid

backbones = sys.argv[1].split(",")
grid_files = [Path(name) for name in sys.argv[2:]]
standard = [("train_4class", "center"), ("val_4class", "center"), ("test_gan", "center"), ("test_diffusion", "center")]
taps = {(model, split, variant): ["ln2"] for model in backbones for split, variant in standard}
for grid_file in grid_files:
    try:
        spec = load_grid(grid_file)
    except ConfigError as error:
        sys.exit(f"error: {error}")
    if spec.model not in backbones:
        print(f"skip\t{grid_file}\t{spec.model}")
        continue
    for ref in (spec.train, spec.val, *spec.tests):
        wanted = taps.setdefault((spec.model, ref.path.stem, ref.variant or "center"), [])
        if spec.tap not in wanted:
            wanted.append(spec.tap)
    print(f"fit\t{grid_file}\t{spec.out}")
for (model, split, variant), names in taps.items():
    print(f"extract\t{model}\t{split}\t{variant}\t{','.join(names)}")
EOF
}

run_paper() {
    if [[ $# -lt 1 ]]; then
        usage >&2
        exit 2
    fi
    local data_root=$1 backbones=$DEFAULT_BACKBONES
    shift
    while [[ $# -gt 0 ]]; do
        case $1 in
            --backbones)
                [[ $# -ge 2 ]] || { usage >&2; exit 2; }
                backbones=$2
                shift 2
                ;;
            --backbones=*)
                backbones=${1#--backbones=}
                shift
                ;;
            *)
                echo "error: unknown option $1" >&2
                usage >&2
                exit 2
                ;;
        esac
    done
    step "checking the data layout under $data_root"
    check_paper_layout "$data_root"
    echo "layout ok"
    setup_venv

    step "manifests (manifests/)"
    run_pipeline manifest --layout cnndetection-train --root "$data_root" --split train_4class --classes "$TRAIN_CLASSES"
    run_pipeline manifest --layout cnndetection-val --root "$data_root" --split val_4class --classes "$TRAIN_CLASSES"
    run_pipeline manifest --layout cnndetection-test --root "$data_root" --split test_gan
    run_pipeline manifest --layout ufd-diffusion --root "$data_root" --split test_diffusion

    local grids=(grid.yaml) grid
    for grid in grids/*.yaml; do
        [[ "$grid" == grids/demo.yaml ]] || grids+=("$grid")
    done
    step "planning the work of ${grids[*]} for backbones $backbones"
    local plan
    plan=$(plan_paper_work "$backbones" "${grids[@]}")

    step "features (cache/): the frozen CLIP over every split the grids need"
    local kind model split variant taps tap options
    while IFS=$'\t' read -r -u 3 kind model split variant taps; do
        [[ "$kind" == extract ]] || continue
        options=(--split "$split" --model "$model")
        for tap in ${taps//,/ }; do
            options+=(--tap "$tap")
        done
        if [[ "$variant" != center ]]; then
            options+=(--perturb "${variant%-*}" --perturb-preset "${variant##*-}")
        elif [[ "$split" == train* ]]; then
            options+=(--views "${VIEWS:-1}")
        fi
        run_pipeline extract "${options[@]}"
    done 3<<<"$plan"

    step "fitting the grids (runs/)"
    local outs=() file out
    while IFS=$'\t' read -r -u 3 kind file out; do
        case $kind in
            fit)
                run_pipeline fit --grid "$file"
                outs+=("$out")
                ;;
            skip)
                echo "skipping $file: its backbone $out is not among --backbones"
                ;;
        esac
    done 3<<<"$plan"

    if [[ ${#outs[@]} -eq 0 ]]; then
        echo "no grid file names any of the backbones $backbones: nothing to fit or report"
        return
    fi
    step "report (reports/)"
    run_pipeline report --out reports "${outs[@]}"
    step "done: tables and plots in reports/"
    ls reports
}

# ---------------------------------------------------------------- main

main() {
    cd "$REPO"
    local mode=${1:-}
    case $mode in
        demo)
            [[ $# -eq 1 ]] || { usage >&2; exit 2; }
            run_demo
            ;;
        test)
            shift
            setup_venv
            step "tests: python -m pytest -q $*"
            exec "$VENV/bin/python" -m pytest -q "$@"
            ;;
        paper)
            shift
            run_paper "$@"
            ;;
        *)
            usage >&2
            exit 2
            ;;
    esac
}

main "$@"
