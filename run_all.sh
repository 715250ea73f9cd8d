#!/usr/bin/env bash
# One-command runs of the RINE pipeline.
#
#   ./run_all.sh demo                 the whole chain on built-in synthetic data (CPU, a few minutes)
#   ./run_all.sh test [PYTEST ARGS]   the test suite
#   ./run_all.sh paper DATA_ROOT [OPTIONS]
#                                     the paper's experiments on the real data (GPU machine):
#                                     `pipeline paper DATA_ROOT [OPTIONS]` (see its --help)
#
# Every mode first creates (or reuses) the virtualenv .venv next to this script
# with the python3 found on PATH. Every step is resumable: running the same
# command again skips what is already finished.
#
# Environment:
#   TORCH_SPEC  pip arguments that install torch when the venv has none
#               (default "torch==2.13.0"; e.g. "torch==2.13.0 --index-url URL" for a CUDA build)
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="$REPO/.venv"
STAMP="$VENV/.run_all-installed"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
# Training views the demo extracts: the views grids/demo.yaml reads (data.train.views) and cycles over its
# 60 epochs; one view per epoch would add ~3 min of extraction (see the grid's comment).
DEMO_VIEWS=2

usage() {
    cat <<'EOF'
usage: ./run_all.sh demo
       ./run_all.sh test [PYTEST ARGS...]
       ./run_all.sh paper DATA_ROOT [--backbones ID[,ID...]] [--grids FILE]... [pipeline paper options]

  demo    builds a small synthetic data set and a tiny random-weight CLIP under demo/,
          then manifest -> audit -> extract -> fit (grids/demo.yaml) -> report into
          demo/reports (open demo/reports/index.html).
          It shows the pipeline working, not detection quality.
  test    runs the test suite: python -m pytest -q
  paper   the paper's experiments on the real data under DATA_ROOT (needs a GPU and the
          Hugging Face hub or its cache): CNNDetection train/ val/ test/ and the
          UniversalFakeDetect sets in test/diffusion_datasets/, optionally Synthbuster and
          the LDM training set. It runs `pipeline paper DATA_ROOT ...`: the layout check,
          manifests, extractions, fits of grid.yaml and grids/*.yaml, and the report, each
          step resumable. Backbones default to
          openai/clip-vit-large-patch14,openai/clip-vit-base-patch32.

Environment: TORCH_SPEC (pip arguments for torch, default torch==2.13.0).
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
    step "installing dependencies (~3 min the first time; quiet while pip works)"
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
    run_pipeline demo --root demo/data --backbone demo/tiny-random-clip
    step "manifests (demo/manifests)"
    local split
    for split in train val test; do
        run_pipeline manifest --layout folder --root "demo/data/$split" --split "$split" --manifests-dir demo/manifests
    done
    step "audit of the test split for metadata shortcuts, as the files are and format-aligned (demo/reports)"
    run_pipeline audit --split test --manifest demo/manifests/test.csv --out demo/reports --no-progress
    run_pipeline audit --split test --manifest demo/manifests/test.csv --out demo/reports --no-progress \
        --perturb format-align
    step "features of the random backbone (demo/cache): $DEMO_VIEWS training views"
    run_pipeline extract --split train --manifest demo/manifests/train.csv --model demo/tiny-random-clip \
        --cache-dir demo/cache --views "$DEMO_VIEWS"
    for split in val test; do
        run_pipeline extract --split "$split" --manifest "demo/manifests/$split.csv" --model demo/tiny-random-clip \
            --cache-dir demo/cache
    done
    run_pipeline extract --split test --manifest demo/manifests/test.csv --model demo/tiny-random-clip \
        --cache-dir demo/cache --perturb format-align
    step "fitting the heads of grids/demo.yaml (demo/runs/demo)"
    run_pipeline fit --grid grids/demo.yaml
    step "report: demo/reports (the page: demo/reports/index.html; results.csv and selection.csv: demo/runs/demo)"
    echo "(random backbone and synthetic data: these numbers show the pipeline working, not detection quality)"
    # The demo ends with its result: the summary card's lines, the last thing `pipeline report` prints.
    run_pipeline report --out demo/reports demo/runs/demo
}

# ---------------------------------------------------------------- paper

run_paper() {
    if [[ $# -lt 1 ]]; then
        usage >&2
        exit 2
    fi
    setup_venv
    # The planner (layout check, manifests, extractions, fits, report) is `pipeline paper`:
    # see `pipeline paper --help` and pipeline/paper.py.
    run_pipeline paper "$@"
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
