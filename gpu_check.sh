#!/usr/bin/env bash
# The attention kernel's GPU check, for whoever has an H200 (or any CUDA GPU): the attention tests
# with the Triton kernel compiled for the GPU (the interpreter off; bf16, full sizes, dK/dV
# determinism over 50 runs), then `python bench.py attention`, which prints the TFLOP/s table and
# the issue's targets with PASS/FAIL. Everything printed is also saved to $OUT/gpu_check.txt
# (OUT defaults to ./bench_out). Takes a few minutes, most of it Triton compiling each variant.
#   bash gpu_check.sh
set -u
cd "$(dirname "$0")"
OUT=${OUT:-bench_out}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.txt"
export TRITON_INTERPRET=0  # test_models.py only sets it when it is unset
PY=$(command -v python3 || command -v python)
# pytest-xdist, where installed, compiles the kernel variants on several cores at once
XDIST=$($PY -c "import xdist" 2>/dev/null && echo "-n 4")
{
    echo "== machine"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    $PY -c "import torch, triton; print('torch', torch.__version__, '| triton', triton.__version__, '| cuda', torch.version.cuda)"
    echo
    echo "== tests (pytest -k attention, on the GPU)"
} 2>&1 | tee "$LOG"
$PY -m pytest -q -k attention -rA -p no:cacheprovider $XDIST test_models.py 2>&1 | tee "$OUT/pytest.txt" | tail -40 | tee -a "$LOG"
tests_rc=${PIPESTATUS[0]}
{
    echo
    echo "== bench (python bench.py attention)"
    $PY bench.py attention
    bench_rc=$?
    echo
    echo "== correctness targets"
    status() {  # PASS when every parametrisation of test $1 passed, FAIL if any failed or none ran
        if grep -q "^\(FAILED\|ERROR\) .*$1" "$OUT/pytest.txt"; then echo FAIL
        elif grep -q "^PASSED .*$1" "$OUT/pytest.txt"; then echo PASS
        else echo "FAIL (did not run)"; fi
    }
    printf '%-58s %s\n' "all attention tests pass on the GPU (pytest exit $tests_rc)" "$([ "$tests_rc" = 0 ] && echo PASS || echo FAIL)"
    printf '%-58s %s\n' "bf16 and full-size cases vs float64 (2x PyTorch's error)" "$(status test_attention_triton_gpu_full_size)"
    printf '%-58s %s\n' "dK and dV (and dQ) bitwise identical across 50 runs" "$(status test_attention_triton_backward_is_deterministic)"
    printf '%-58s %s\n' "bench.py ran (exit $bench_rc)" "$([ "$bench_rc" = 0 ] && echo PASS || echo FAIL)"
    echo "(the speed targets are in the bench's own table above)"
} 2>&1 | tee -a "$LOG"
