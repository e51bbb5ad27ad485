#!/usr/bin/env bash
# The GPU paths, checked once on a machine with a CUDA device, in under 8 minutes by design (each stage has its own
# time limit; their sum is 460 s). Run from the repository root:
#
#     bash bench/gpu_check.sh [RESULTS.md]      # default: $OUT/gpu_check.md if $OUT is set, else results/gpu_check.md
#
# Stages, each recorded in the one results file with its command, exit status, seconds and output:
#   1. the test suite's CUDA-marked tests (tests/test_cuda.py): the scan on the GPU against the CPU reference and
#      under autocast, pre-training of vit, gcnn and ssm for a few AMP steps (finite loss, a resume equal to a
#      straight run within tolerance), bags from the GPU against the CPU's within autocast tolerance
#   2. torchrun on one GPU: clear.py pretrain, then clear.py extract
#   3. the selective scan's speed and memory on the GPU: sequential, chunked, parallel, and mambapy's pscan when
#      installed (pip install --no-deps mambapy; its row is left out otherwise)
#   4. what autograd keeps for backward at 224 px (benchmark.py memory), on the GPU
#   5. a small accuracy run at 224 px (benchmark.py accuracy --quick at --img-size 224, every encoder)
# Without a CUDA device it stops at once with one line and exit status 2; the exit status is 1 if any stage failed.
set -u
cd "$(dirname "$0")/.." || exit 2
PY=${PYTHON:-python}
RESULTS=${1:-${OUT:-results}/gpu_check.md}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

"$PY" -c "import torch" 2>/dev/null || { echo "bench/gpu_check.sh: $PY cannot import torch; nothing run" >&2; exit 2; }
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "bench/gpu_check.sh: no CUDA device visible to torch ($PY); nothing run" >&2
    exit 2
fi
command -v timeout >/dev/null || { echo "bench/gpu_check.sh: needs coreutils' timeout" >&2; exit 2; }
mkdir -p "$(dirname "$RESULTS")" || exit 2

{
    echo "# bench/gpu_check.sh"
    echo
    "$PY" -c "import torch; p = torch.cuda.get_device_properties(0); print(f'{p.name}, {p.total_memory / 2**30:.0f} GiB, \
capability {p.major}.{p.minor}; torch {torch.__version__}, CUDA {torch.version.cuda}; {torch.cuda.device_count()} GPU(s)')"
    echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown), $(date -u +%Y-%m-%dT%H:%MZ)"
} > "$RESULTS"
FAILED=0

stage() {  # stage NAME SECONDS COMMAND...: run it under a time limit, record it in $RESULTS
    local name=$1 limit=$2
    shift 2
    echo "gpu_check: $name (at most $limit s)" >&2
    local t0=$SECONDS
    timeout --kill-after=10 "$limit" "$@" > "$WORK/log" 2>&1
    local rc=$?
    [ "$rc" -eq 0 ] || FAILED=1
    {
        echo
        echo "## $name: $([ "$rc" -eq 0 ] && echo ok || echo "FAILED (exit $rc$([ "$rc" -ge 124 ] && echo ', time limit'))"), $((SECONDS - t0)) s"
        echo
        echo "    $*"
        echo
        echo '```'
        tail -n 80 "$WORK/log"
        echo '```'
    } >> "$RESULTS"
}

stage "CUDA-marked tests" 140 "$PY" -m pytest -q -m cuda -rs
torchrun_pipeline() {
    "$PY" clear.py synth --out "$WORK/c" --n 8 --size 48 --thickness 8 10 --workers 4 &&
    "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 clear.py pretrain --data "$WORK/c" \
        --out "$WORK/tr.pt" --encoder ssm --steps 4 --batch-size 16 --img-size 32 --mlp-dim 128 --proj-dim 64 &&
    "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 clear.py extract --data "$WORK/c" \
        --out "$WORK/bags" --checkpoint "$WORK/tr.pt" &&
    grep -q '"compute": "cuda, ' "$WORK/bags/manifest.json" && cat "$WORK/bags/manifest.json"
}
stage "torchrun on one GPU: pretrain, extract" 70 bash -c "$(declare -f torchrun_pipeline); PY='$PY' WORK='$WORK' torchrun_pipeline"
stage "selective scan fwd+bwd on the GPU" 70 "$PY" benchmark.py scan --device cuda --lengths 196 1024 --repeat 3
stage "kept for backward at 224 px, on the GPU" 40 "$PY" benchmark.py memory --device cuda
stage "accuracy at 224 px, small" 140 "$PY" benchmark.py accuracy --quick --img-size 224 --steps 20 --batch-size 32 \
    --encoders vit gcnn ssm --methods lecl random --out "$WORK/accuracy" --work "$WORK/accuracy-work"

echo "gpu_check: results in $RESULTS$([ "$FAILED" -eq 0 ] || echo '; some stage FAILED')" >&2
exit "$FAILED"
