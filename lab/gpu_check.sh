#!/usr/bin/env bash
# The GPU check of both Triton kernels, FlashAttention and the selective scan, as one command for
# a machine with a CUDA GPU (the speed targets are an H200's):
#   bash lab/gpu_check.sh    # everything printed is also saved under $OUT (default ./bench_out)
# The whole run, preflight and every kill grace included, ends within TOTAL_S seconds (480) by
# construction: each stage runs under `timeout` for min(its budget, the time left - its kill
# grace - SUMMARY_S), and is skipped, saying so, when that is less than its minimum.
#   stage                                                          budget  minimum  grace (s)
#   0 preflight: $PYTHON imports torch, triton, numpy, pytest and       60        -      5
#     sees a CUDA GPU (else exit 3, nothing compiled); nvidia-smi       10        -      2
#   1 smoke: python -m lab.gpu_smoke, one tiny fwd+bwd per kernel       60       20      5
#     family and dtype, whole tracebacks, registers/spills/shared
#   2 tests: the Triton kernel tests compiled for the GPU              150       60     10
#     (KERNEL_TESTS below: node ids, nothing else from the suite)
#   3 python -m lab.bench attention (TFLOP/s, share of a bf16 matmul)  110       40      5
#   4 python -m lab.bench scan                                          60       30      5
#   5 python -m lab.bench sweep: KERNEL_CONFIG settings, 6-8 per kernel  60       30      5
#   summary (grep and sort of the files above)                    SUMMARY_S=10
# Each stage's budget can be set: SMOKE_S TESTS_S ATTENTION_S SCAN_S SWEEP_S; PYTHON=python3.
# Exit: 0 all correctness targets passed; 1 the smoke stage or a test failed, did not run or ran
# out of time; 3 preflight failed; 4 correctness passed but a benchmark failed, was skipped or ran
# out of time.
# A timeout (exit 124, or 137 once the grace is over) is reported as OUT OF TIME.
set -u
cd "$(dirname "$0")/.."  # the repository root
START=$(date +%s)
PYTHON=${PYTHON:-python3}
TOTAL_S=${TOTAL_S:-480}
SUMMARY_S=10
OUT=${OUT:-bench_out}
export PYTHONUNBUFFERED=1  # every line reaches the log as it is printed, also from a run cut short
export TRITON_INTERPRET=0  # test_models.py only sets it when it is unset
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
LOG="$OUT/gpu_check.txt"
: > "$LOG"
log() { printf '%s\n' "$*" | tee -a "$LOG"; }
left() { echo $(( TOTAL_S - SUMMARY_S - ($(date +%s) - START) )); }
preflight_failed() {
    log "preflight FAILED: $*"
    log "nothing was compiled or run on the GPU; fix the above and run bash lab/gpu_check.sh again"
    exit 3
}
# The Triton kernel tests, by node id: each runs the kernels on the GPU (TRITON_DEVICE or
# needs_gpu in test_models.py); lab/test_gpu_compile.py checks that this list and the file agree.
KERNEL_TESTS=(
    test_attention_triton_matches_float64
    test_attention_triton_keeps_row_logsumexp
    test_attention_triton_under_other_launch_settings
    test_attention_triton_follows_autocast_and_mixed_dtypes
    test_attention_triton_gpu_full_size
    test_attention_triton_backward_is_deterministic
    test_scan_triton_gpu_matches_float64
    test_models_through_the_triton_kernels
)

# stage NAME BUDGET MINIMUM GRACE OUTFILE COMMAND...: COMMAND under timeout within the time left;
# sets rc (0 when it ran and passed; 124 out of time; "skipped" when there was no time)
stage() {
    local name=$1 want=$2 min=$3 grace=$4 file=$5
    shift 5
    local budget=$(( $(left) - grace ))
    [ "$budget" -gt "$want" ] && budget=$want
    log ""
    if [ "$budget" -lt "$min" ]; then
        log "== $name: SKIPPED: $(left)s left of ${TOTAL_S}s, it needs ${min}s + ${grace}s grace"
        rc=skipped
        return
    fi
    log "== $name (at most ${budget}s + ${grace}s grace; $(( $(date +%s) - START ))s into the run)"
    timeout -s INT -k "$grace" "$budget" "$@" 2>&1 | tee "$OUT/$file" | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
        log "$name: OUT OF TIME after ${budget}s (exit $rc)"
        rc=124
    fi
}

log "== preflight ($(date -u '+%Y-%m-%d %H:%M:%S UTC'), at most ${TOTAL_S}s in all)"
command -v timeout >/dev/null || preflight_failed "no 'timeout' command (coreutils): it keeps each step in its budget"
command -v "$PYTHON" >/dev/null || preflight_failed "no '$PYTHON' on PATH (set PYTHON=...)"
info=$(timeout -k 5 60 "$PYTHON" - 2>&1 <<'PY'
import platform, sys
try:
    import numpy, pytest, torch, triton
except ImportError as e:
    sys.exit(f"{sys.executable} cannot import torch, triton, numpy and pytest: {e}")
if not torch.cuda.is_available():
    sys.exit(f"torch sees no CUDA device (torch {torch.__version__}, CUDA build {torch.version.cuda})")
major, minor = torch.cuda.get_device_capability()
print(f"GPU {torch.cuda.get_device_name()} (sm_{major}{minor}, {torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB)")
print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"triton {triton.__version__}, numpy {numpy.__version__}, pytest {pytest.__version__}")
PY
)
case $? in
    0) ;;
    124|137) preflight_failed "$PYTHON took more than 60s to import torch and see the GPU" ;;
    *) preflight_failed "$(printf '%s' "$info" | tail -n 1)" ;;
esac
log "$info"
if command -v nvidia-smi >/dev/null; then
    timeout -k 2 10 nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv,noheader 2>&1 | tee -a "$LOG"
fi

export KERNEL_ERROR_LOG="$OUT/kernel_errors.tsv"
: > "$KERNEL_ERROR_LOG"
XDIST=$(timeout 20 "$PYTHON" -c "import xdist" 2>/dev/null && echo "-n 8")  # compiles on several cores at once

stage "smoke ($PYTHON -m lab.gpu_smoke)" "${SMOKE_S:-60}" 20 5 smoke.txt "$PYTHON" -m lab.gpu_smoke
smoke_rc=$rc
# SIGINT first: pytest then still prints the summary of the tests that ran
stage "tests (the ${#KERNEL_TESTS[@]} Triton kernel tests, TRITON_INTERPRET=0${XDIST:+, $XDIST})" "${TESTS_S:-150}" 60 10 pytest.txt \
    "$PYTHON" -m pytest -q -rA -p no:cacheprovider --durations=10 $XDIST "${KERNEL_TESTS[@]/#/test_models.py::}"
tests_rc=$rc
bench_rc=0
for section in attention scan sweep; do
    case $section in
        attention) want=${ATTENTION_S:-110}; min=40 ;;
        scan) want=${SCAN_S:-60}; min=30 ;;
        sweep) want=${SWEEP_S:-60}; min=30 ;;
    esac
    extra=()
    [ "$section" = sweep ] && extra=("--budget=$(( want - 5 ))")
    stage "bench ($PYTHON -m lab.bench $section)" "$want" "$min" 5 "bench_$section.txt" \
        "$PYTHON" -m lab.bench "$section" ${extra[@]+"${extra[@]}"}
    [ "$rc" != 0 ] && bench_rc=$rc
done

correct=1
target() {  # $1 what, $2 PASS or FAIL ...: a correctness target
    printf '%-62s %s\n' "$1" "$2" | tee -a "$LOG"
    case $2 in PASS*) ;; *) correct=0 ;; esac
}
test_status() {  # PASS when every parametrisation of test $1 passed, FAIL if any failed or none ran
    if grep -q "^\(FAILED\|ERROR\) .*$1" "$OUT/pytest.txt" 2>/dev/null; then echo FAIL
    elif grep -q "^PASSED .*$1" "$OUT/pytest.txt" 2>/dev/null; then echo PASS
    else echo "FAIL (did not run)"; fi
}
log ""
log "== correctness targets"
target "smoke: every kernel family and dtype ran (exit $smoke_rc)" "$([ "$smoke_rc" = 0 ] && echo PASS || echo FAIL)"
target "all selected tests pass on the GPU (pytest exit $tests_rc)" "$([ "$tests_rc" = 0 ] && echo PASS || echo FAIL)"
target "attention: small cases vs float64 (2x PyTorch's error + floor)" "$(test_status test_attention_triton_matches_float64)"
target "attention: bf16 and full-size cases vs float64" "$(test_status test_attention_triton_gpu_full_size)"
target "attention: dK and dV (and dQ) bitwise identical over 50 runs" "$(test_status test_attention_triton_backward_is_deterministic)"
target "scan: fp32 and bf16 (B=32 D=1024 L=2048) vs float64 (2x PyTorch's error per element size + floor)" "$(test_status test_scan_triton_gpu_matches_float64)"
log ""
log "== kernel errors against their bounds (largest error / bound first; from $KERNEL_ERROR_LOG)"
log "   error / bound near 1 means the bound is tight; the 'error / floor' of the fp32 attention cases"
log "   shows how the 16-ulp floor fares with the GPU's approximate exp2, log2 and division"
sort -t$'\t' -k5,5 -g -r "$KERNEL_ERROR_LOG" | head -n 25 | cut -c1-200 | tee -a "$LOG"
log "($(wc -l < "$KERNEL_ERROR_LOG") measurements in all)"
log ""
log "== speed targets (from the benchmarks above)"
grep -h "PASS\|FAIL" "$OUT/bench_attention.txt" "$OUT/bench_scan.txt" 2>/dev/null | tee -a "$LOG"
printf '%-62s %s\n' "lab.bench attention, scan and sweep finished (exit $bench_rc)" \
    "$([ "$bench_rc" = 0 ] && echo PASS || echo FAIL)" | tee -a "$LOG"
log ""
log "(run took $(( $(date +%s) - START ))s of at most ${TOTAL_S}s)"
if [ "$correct" = 0 ]; then
    log "RESULT: FAIL: a correctness target failed, did not run or ran out of time (files in $OUT)"
    exit 1
elif [ "$bench_rc" != 0 ]; then
    log "RESULT: correctness PASS, but a benchmark failed, was skipped or ran out of time (files in $OUT)"
    exit 4
fi
log "RESULT: PASS (files in $OUT)"
exit 0
