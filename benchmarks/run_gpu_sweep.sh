#!/usr/bin/env bash
# The GPU benchmark in one call (H100/H200, fits a 10-minute command): GPU tests, the kernel
# sweep, the end-to-end UNet case, then the markdown table and plots. Results land in
# benchmarks/results/<device>-<yyyymmdd>.{csv,md} (+ PNGs) with a log holding the device,
# driver, versions, commit and date; when $OUT is set the files this run wrote are copied there
# too. The sweep runs every implementation, the FA3-class floor among them (sdpa_floor: cuDNN SDPA
# on Hopper, flash SDPA elsewhere). Without a CUDA device it refuses at once.
#
#   VSTAR_BENCH_COMMIT=<commit of the code> bash benchmarks/run_gpu_sweep.sh [STAGE]
#
# STAGE: all (default) | tests | kernels | e2e | quick | speculation | lean
#   tests runs pytest's TEST_ARGS (default: -m gpu tests, the tests marked gpu; the Triton kernel files
#   tests/kernels/test_*.py run on the GPU unmarked: name them, e.g. TEST_ARGS="tests/kernels/test_lean.py").
#   lean (not in all): the lean forward (backend="triton-lean"): its two loops autotuned, warp-specialized and not,
#   against two passes and the floor at the DiT shapes, and its speculative form at each forced flag rate
#   (benchmarks/speculation.py --lean), budget SPEC_BUDGET_S.
#   speculation (not in all): the speculative one pass against two passes and the floor at the DiT shapes
#   and forced flag rates 0 / 5 / 20 / 100%, and the launches timed apart (the row-max walk, the biased loop, the
#   redo) with the profiler (benchmarks/speculation.py), budget SPEC_BUDGET_S.
#   Both take SPEC_SHAPES (DiT shape names, default all) and SPEC_RATES (forced flag rates, default 0 0.05 0.2 1).
#   kernels and e2e resume: cells this commit already measured in today's CSV (copied back into
#   benchmarks/results/ between calls) are skipped, so a second call continues where the first
#   one's time budget ran out. Budgets (seconds): TEST_BUDGET_S, KERNEL_BUDGET_S, E2E_BUDGET_S (quick
#   takes KERNEL_BUDGET_S). A stage's budget is checked before each case, and a case begun in time runs to its
#   end: CALL_BUDGET_S (default 570, under the 10-minute command) bounds the whole call, each stage cut with
#   SIGINT (what it measured stays) where it would leave less than 45 s for the tables, plots and copy to $OUT;
#   set it under a call's limit where that is shorter.
# Triton 3.9 (the images had an older one) is carried in .whl/triton39.tar.xz (TRITON_TARBALL): it goes first.
# Optional packages the GPU machine lacks (diffusers, tqdm) can be carried in .gpu_site/
# (pip install --target .gpu_site diffusers tqdm); without them the UNet rows say why.
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "$#" -gt 1 ]; then
    echo "run_gpu_sweep.sh: one STAGE at most, got $# arguments: $*" >&2
    exit 2
fi
STAGE="${1:-all}"
case "$STAGE" in
    all | tests | kernels | e2e | quick | speculation | lean) ;;
    *) echo "run_gpu_sweep.sh: unknown stage '$STAGE' (all, tests, kernels, e2e, quick, speculation, lean)" >&2
       exit 2 ;;
esac
TEST_BUDGET_S="${TEST_BUDGET_S:-120}"
TEST_ARGS="${TEST_ARGS:--m gpu tests}"
KERNEL_BUDGET_S="${KERNEL_BUDGET_S:-300}"
E2E_BUDGET_S="${E2E_BUDGET_S:-90}"
SPEC_BUDGET_S="${SPEC_BUDGET_S:-420}"
CALL_BUDGET_S="${CALL_BUDGET_S:-570}"
case "$CALL_BUDGET_S" in
    "" | *[!0-9]*) echo "run_gpu_sweep.sh: CALL_BUDGET_S is whole seconds, got '$CALL_BUDGET_S'" >&2
        exit 2 ;;
esac
CALL_BUDGET_S=$((10#$CALL_BUDGET_S))  # decimal: bash arithmetic reads 0570 as octal and fails on 08
CALL_START_S="$(date +%s)"
RESULTS=benchmarks/results
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -d .gpu_site ]; then
    export PYTHONPATH="$PWD/.gpu_site:$PYTHONPATH"
fi
if ! python3 -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
    echo "run_gpu_sweep.sh needs a CUDA device, and torch sees none: on the CPU its GPU-sized shapes would crawl" \
        "through the Triton interpreter. For a CPU smoke run: python3 -m vstar_kernels bench --quick" >&2
    exit 1
fi
# Triton 3.9 carried in (benchmarks/NOTES.md, "Carrying Triton 3.9"; the images had 3.6): the wheel's files in
# TRITON_TARBALL (default .whl/triton39.tar.xz, an ignored path a call carries) are unpacked once a machine under
# $TMPDIR and put first on PYTHONPATH, with TRITON_BACKENDS_IN_TREE=1 so that the image's Triton's backend entry
# points are not followed, and ptxas-blackwell linked to ptxas where the tarball left it out (3.9 looks for it).
TRITON_TARBALL="${TRITON_TARBALL:-.whl/triton39.tar.xz}"
TRITON_FROM="the image's"
if [ -f "$TRITON_TARBALL" ]; then
    site="${TMPDIR:-/tmp}/vstar-triton-$(cksum < "$TRITON_TARBALL" | cut -d' ' -f1)"
    if [ ! -f "$site/.unpacked" ]; then
        rm -rf "$site"
        if ! { mkdir -p "$site" && tar -xJf "$TRITON_TARBALL" -C "$site" && touch "$site/.unpacked"; }; then
            echo "run_gpu_sweep.sh: could not unpack $TRITON_TARBALL into $site" >&2
            exit 1
        fi
    fi
    init="$(find "$site" -maxdepth 3 -path '*/triton/__init__.py' | head -n 1)"
    if [ -z "$init" ]; then
        echo "run_gpu_sweep.sh: $TRITON_TARBALL holds no triton/__init__.py (unpacked in $site)" >&2
        exit 1
    fi
    nvidia_bin="$(dirname "$init")/backends/nvidia/bin"
    if [ -e "$nvidia_bin/ptxas" ] && [ ! -e "$nvidia_bin/ptxas-blackwell" ]; then
        ln -s ptxas "$nvidia_bin/ptxas-blackwell"
    fi
    PYTHONPATH="$(dirname "$(dirname "$init")"):$PYTHONPATH"
    export PYTHONPATH TRITON_BACKENDS_IN_TREE=1
    TRITON_FROM="$TRITON_TARBALL, unpacked in $(dirname "$(dirname "$init")")"
fi
# A Triton the kernels cannot compile with (older than 3.7) would spend every budget on errors: refuse at once.
why="$(python3 -c "from vstar_kernels.ops import _load; print(_load.triton_ops().reason)")" || exit 1
if [ -n "$why" ]; then
    echo "run_gpu_sweep.sh: the Triton kernels cannot load here: $why" >&2
    exit 1
fi
# the code measured: HEAD, "-dirty" where the tree differs from it outside the results (which the stages write:
# a second call names the commit the first did, and --resume keeps its cells)
if head="$(git rev-parse --short=12 HEAD 2>/dev/null)"; then
    git diff --quiet HEAD -- . ':!benchmarks/results' || head="$head-dirty"
fi
export VSTAR_BENCH_COMMIT="${VSTAR_BENCH_COMMIT:-${head:-unknown}}"
# --resume keeps the cells of today's rows of this commit: of "unknown" (a copy without .git), any code's
RESUME=--resume
UNKNOWN_COMMIT=""
if [ "$VSTAR_BENCH_COMMIT" = unknown ]; then
    RESUME=""
    UNKNOWN_COMMIT="run_gpu_sweep.sh: commit unknown (no git here, VSTAR_BENCH_COMMIT unset): the rows say"
    UNKNOWN_COMMIT="$UNKNOWN_COMMIT 'unknown', and kernels, e2e and quick run without --resume"
fi
# without diffusers (the images lack it unless .gpu_site carries it), the tests stage skips the modules of
# tests/integrations that import it, saying why (tests/integrations/conftest.py), where they would be collection errors
WITHOUT_DIFFUSERS=""
if { [ "$STAGE" = all ] || [ "$STAGE" = tests ]; } && ! python3 -c "import diffusers" 2> /dev/null; then
    export VSTAR_TESTS_WITHOUT_DIFFUSERS=1
    WITHOUT_DIFFUSERS="run_gpu_sweep.sh: diffusers is not importable: the tests stage skips the modules that import it"
fi
mkdir -p "$RESULTS"
STAMP="$(date -u +%Y%m%d)"
START_MARK="$(mktemp)"  # the files this run writes are newer: only they go to $OUT
FAILED="$(mktemp)"      # the stages that exited non-zero (run in the tee'd subshell): the script's exit status
LOG="$RESULTS/gpu-$STAMP-$(date -u +%H%M%S)-$STAGE.log"

# the kernel sweep's shapes: every named GPU shape but the UNets (the e2e stage's)
KERNEL_SHAPES='from vstar_kernels.bench import shapes as s; print(*(n for n in s.GPU_FULL if not s.is_unet(n)))'
STAGE_RESERVE_S=45  # what a stage leaves of CALL_BUDGET_S for the tables and plots (which leave 10 s for the copy)

run_stage() {  # name, then the command: cut (SIGINT, then SIGKILL 15 s later) where it would pass the call's budget
    local name="$1"
    shift
    local left=$((CALL_START_S + CALL_BUDGET_S - STAGE_RESERVE_S - $(date +%s)))
    if [ "$left" -le 0 ]; then
        echo "== $name: not started, CALL_BUDGET_S=$CALL_BUDGET_S spent ($(date -u +%T))"
        echo "$name (not started: CALL_BUDGET_S spent)" >> "$FAILED"
        return
    fi
    echo "== $name: $* ($(date -u +%T), cut at $left s)"
    timeout -s INT -k 15 "$left" "$@"
    local status=$?
    local why="exit $status"
    if [ "$status" -eq 124 ] || [ "$status" -eq 137 ]; then
        why="exit $status: cut by a time limit"
    fi
    echo "== $name: $why ($(date -u +%T))"
    [ "$status" -eq 0 ] || echo "$name ($why)" >> "$FAILED"
}

{
    echo "date: $(date -u +%FT%TZ)  stage: $STAGE  commit: $VSTAR_BENCH_COMMIT  Triton: $TRITON_FROM"
    [ -z "$UNKNOWN_COMMIT" ] || echo "$UNKNOWN_COMMIT"
    [ -z "$WITHOUT_DIFFUSERS" ] || echo "$WITHOUT_DIFFUSERS"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.memory --format=csv
    python3 -m vstar_kernels info
    case "$STAGE" in
        all | tests)
            # SIGINT: pytest stops and still prints what passed and failed. -k: this timeout is run_stage's
            # command, in a process group of its own, which run_stage's SIGKILL does not reach: this one kills pytest
            # 10 s after either SIGINT (its budget's or run_stage's forwarded), before run_stage kills it (15 s)
            run_stage "gpu tests" timeout -s INT -k 10 "$TEST_BUDGET_S" python3 -m pytest -q $TEST_ARGS ;;&
        all | kernels)
            run_stage "kernel sweep" python3 -m vstar_kernels bench --out "$RESULTS" --no-progress $RESUME \
                --no-plots --shapes $(python3 -c "$KERNEL_SHAPES") --time-budget-s "$KERNEL_BUDGET_S" ;;&
        all | e2e)
            run_stage "UNet end to end" python3 -m vstar_kernels bench --out "$RESULTS" --no-progress $RESUME \
                --no-plots --shapes unet-modelscope-320x512 unet-modelscope-256x256 --time-budget-s "$E2E_BUDGET_S" ;;&
        quick)
            run_stage "quick sweep" python3 -m vstar_kernels bench --quick --out "$RESULTS" --no-progress $RESUME \
                --no-plots --time-budget-s "$KERNEL_BUDGET_S" ;;
        speculation)
            run_stage "speculative one pass" python3 benchmarks/speculation.py --out "$RESULTS" \
                --time-budget-s "$SPEC_BUDGET_S" ${SPEC_SHAPES:+--shapes $SPEC_SHAPES} \
                ${SPEC_RATES:+--rates $SPEC_RATES} ;;
        lean)
            run_stage "lean forward" python3 benchmarks/speculation.py --lean --out "$RESULTS" \
                --time-budget-s "$SPEC_BUDGET_S" ${SPEC_SHAPES:+--shapes $SPEC_SHAPES} \
                ${SPEC_RATES:+--rates $SPEC_RATES} ;;
    esac
    # today's files only (with none, plot_results.py would render every committed one): the day the call began
    # and, past midnight UTC, the day the stages wrote their files on
    today=$(ls "$RESULTS"/*-"$STAMP".csv "$RESULTS"/*-"$(date -u +%Y%m%d)".csv 2>/dev/null | sort -u)
    if [ -n "$today" ]; then
        STAGE_RESERVE_S=10
        run_stage "tables and plots" python3 benchmarks/plot_results.py $today
    fi
} 2>&1 | tee "$LOG"

if [ -n "${OUT:-}" ]; then
    written=$(find "$RESULTS" -maxdepth 1 -type f -newer "$START_MARK")
    if [ -z "$written" ] || cp $written "$OUT"/; then
        echo "copied $(echo "$written" | grep -c .) files this run wrote to $OUT"
    else
        echo "copy to \$OUT (exit $?)" >> "$FAILED"
    fi
fi
rm -f "$START_MARK"
if [ -s "$FAILED" ]; then
    echo "run_gpu_sweep.sh: stages that failed: $(paste -sd, "$FAILED")" >&2
    rm -f "$FAILED"
    exit 1
fi
rm -f "$FAILED"
