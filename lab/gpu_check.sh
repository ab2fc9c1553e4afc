#!/usr/bin/env bash
# The GPU check of both Triton kernels, FlashAttention and the selective scan, as one command for
# a machine with a CUDA GPU (the speed targets are an H200's). Fits a 10-minute limit:
#   bash lab/gpu_check.sh    # everything printed is also saved under $OUT (default ./bench_out)
# 1. preflight: $PYTHON (default python3) imports torch, triton, numpy and pytest and sees a CUDA
#    device, or the script stops at once with the reason (exit 3), before anything is compiled
# 2. the kernel tests compiled for the GPU (TRITON_INTERPRET=0; pytest -k "attention or
#    scan_triton_gpu": bf16, full sizes, dK/dV determinism), within TEST_BUDGET_S seconds
# 3. python -m lab.bench attention, then python -m lab.bench scan, each within its own budget; they run
#    even when the tests failed or ran out of time
# 4. a summary: PASS/FAIL per correctness target, the speed targets, and every measured kernel
#    error against the bound its test holds it to ($OUT/kernel_errors.tsv)
# Exit: 0 all correctness targets passed; 1 a test failed, did not run or the tests ran out of
# time; 3 preflight failed; 4 the tests passed but a benchmark failed or ran out of time.
# Budgets (seconds): TEST_BUDGET_S=240 ATTENTION_BENCH_S=180 SCAN_BENCH_S=120; PYTHON=python3.
set -u
cd "$(dirname "$0")/.."  # the repository root
PYTHON=${PYTHON:-python3}
TEST_BUDGET_S=${TEST_BUDGET_S:-240}
ATTENTION_BENCH_S=${ATTENTION_BENCH_S:-180}
SCAN_BENCH_S=${SCAN_BENCH_S:-120}
OUT=${OUT:-bench_out}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
LOG="$OUT/gpu_check.txt"
: > "$LOG"
log() { printf '%s\n' "$*" | tee -a "$LOG"; }
preflight_failed() {
    log "preflight FAILED: $*"
    log "nothing was compiled or run on the GPU; fix the above and run bash lab/gpu_check.sh again"
    exit 3
}

log "== preflight ($(date -u '+%Y-%m-%d %H:%M:%S UTC'))"
command -v timeout >/dev/null || preflight_failed "no 'timeout' command (coreutils): it keeps each step in its budget"
command -v "$PYTHON" >/dev/null || preflight_failed "no '$PYTHON' on PATH (set PYTHON=...)"
err=$("$PYTHON" -c "import torch, triton, numpy, pytest" 2>&1) \
    || preflight_failed "$PYTHON cannot import torch, triton, numpy and pytest: $(printf '%s' "$err" | tail -n 1)"
info=$("$PYTHON" - 2>&1 <<'PY'
import platform, sys
import numpy, pytest, torch, triton
if not torch.cuda.is_available():
    sys.exit(f"torch sees no CUDA device (torch {torch.__version__}, CUDA build {torch.version.cuda})")
major, minor = torch.cuda.get_device_capability()
print(f"GPU {torch.cuda.get_device_name()} (sm_{major}{minor}, {torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB)")
print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"triton {triton.__version__}, numpy {numpy.__version__}, pytest {pytest.__version__}")
PY
) || preflight_failed "$(printf '%s' "$info" | tail -n 1)"
log "$info"
if command -v nvidia-smi >/dev/null; then
    timeout 30 nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv,noheader 2>&1 | tee -a "$LOG"
fi
log "budgets: tests ${TEST_BUDGET_S}s, bench attention ${ATTENTION_BENCH_S}s, bench scan ${SCAN_BENCH_S}s"

export TRITON_INTERPRET=0  # test_models.py only sets it when it is unset
export KERNEL_ERROR_LOG="$OUT/kernel_errors.tsv"
: > "$KERNEL_ERROR_LOG"
# pytest-xdist, where installed, compiles the kernel variants on several cores at once
XDIST=$("$PYTHON" -c "import xdist" 2>/dev/null && echo "-n 8")
log ""
log "== tests (TRITON_INTERPRET=0 pytest -k \"attention or scan_triton_gpu\" ${XDIST}, at most ${TEST_BUDGET_S}s)"
# SIGINT first: pytest then still prints the summary of the tests that ran
timeout -s INT -k 30 "$TEST_BUDGET_S" "$PYTHON" -m pytest -q -rA -p no:cacheprovider --durations=10 $XDIST \
    -k "attention or scan_triton_gpu" test_models.py 2>&1 | tee "$OUT/pytest.txt" | tee -a "$LOG"
tests_rc=${PIPESTATUS[0]}
[ "$tests_rc" = 124 ] && log "tests: OUT OF TIME after ${TEST_BUDGET_S}s (raise TEST_BUDGET_S)"

bench_rc=0
for section in attention scan; do
    budget=$([ "$section" = attention ] && echo "$ATTENTION_BENCH_S" || echo "$SCAN_BENCH_S")
    log ""
    log "== bench ($PYTHON -m lab.bench $section, at most ${budget}s)"
    timeout -s INT -k 15 "$budget" "$PYTHON" -m lab.bench "$section" 2>&1 | tee "$OUT/bench_$section.txt" | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    [ "$rc" = 124 ] && log "bench $section: OUT OF TIME after ${budget}s"
    [ "$rc" != 0 ] && bench_rc=$rc
done

correct=1
target() {  # $1 what, $2 PASS or FAIL ...: a correctness target
    printf '%-62s %s\n' "$1" "$2" | tee -a "$LOG"
    case $2 in PASS*) ;; *) correct=0 ;; esac
}
test_status() {  # PASS when every parametrisation of test $1 passed, FAIL if any failed or none ran
    if grep -q "^\(FAILED\|ERROR\) .*$1" "$OUT/pytest.txt"; then echo FAIL
    elif grep -q "^PASSED .*$1" "$OUT/pytest.txt"; then echo PASS
    else echo "FAIL (did not run)"; fi
}
log ""
log "== correctness targets"
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
grep -h "PASS\|FAIL" "$OUT/bench_attention.txt" "$OUT/bench_scan.txt" | tee -a "$LOG"
printf '%-62s %s\n' "lab.bench attention and scan finished (exit $bench_rc)" \
    "$([ "$bench_rc" = 0 ] && echo PASS || echo FAIL)" | tee -a "$LOG"
log ""
if [ "$correct" = 0 ]; then
    log "RESULT: FAIL: a correctness target failed, did not run or ran out of time (files in $OUT)"
    exit 1
elif [ "$bench_rc" != 0 ]; then
    log "RESULT: correctness PASS, but a benchmark failed or ran out of time (files in $OUT)"
    exit 4
fi
log "RESULT: PASS (files in $OUT)"
exit 0
