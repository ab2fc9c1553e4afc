#!/usr/bin/env bash
# The selective scan's GPU checks, for a machine with a CUDA GPU (the targets were set for an
# H200). Correctness of the Triton kernel at full size, then `python bench.py scan`, which
# prints the table and PASS/FAIL for: Triton forward >= 50% of the measured HBM bandwidth,
# and Triton forward+backward >= 5x the chunked algorithm on the same GPU.
# Usage: bash gpu_scan_check.sh   (about a minute; most of it compiling and the Blelloch baseline)
set -euo pipefail
cd "$(dirname "$0")"
unset TRITON_INTERPRET
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python - <<'PY'
import torch
import kernels
from bench import scan_args

assert torch.cuda.is_available(), "no CUDA device"
ok = True


def check(name, got, want, tol):
    global ok
    err = ((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-30)).item()
    good = err <= tol and torch.isfinite(got).all().item()
    ok &= good
    print(f"{name:>30}: max error / max value {err:.1e} (tolerance {tol:.0e}) {'PASS' if good else 'FAIL'}")


def compare(label, Bsz, Dm, N, L, dtype, other, tol):
    """Triton vs another path on the same inputs: output, last state, every gradient."""
    args = scan_args(Bsz, Dm, N, L, "cuda", dtype)
    args["initial_state"] = torch.randn(Bsz, Dm, N, device="cuda").requires_grad_()
    results = []
    for impl in ("triton", other):
        out, last = kernels.selective_scan(**args, return_last_state=True, impl=impl)
        g = torch.Generator(device="cuda").manual_seed(1)
        loss = (out.float() * torch.randn(out.shape, device="cuda", generator=g)).sum() \
            + (last * torch.randn(last.shape, device="cuda", generator=g)).sum()
        results.append([out, last, *torch.autograd.grad(loss, list(args.values()))])
    names = ["out", "last state"] + ["d" + k for k in args]
    for n, a, b in zip(names, *results):
        check(f"{label} {n}", a, b, tol)


# fp32, a length that is not a multiple of the checkpoint interval, D not a multiple of the block
compare("fp32 vs ref", 2, 200, 16, 333, torch.float32, "ref", 1e-4)
# full benchmark size, bf16 inputs: both paths read the same bf16 values and accumulate in fp32,
# so they differ by bf16 rounding of the outputs and gradients (2^-8 relative)
compare("bf16 B=32 L=2048 D=1024 vs chunked", 32, 1024, 16, 2048, torch.bfloat16, "chunked", 2e-2)
print("correctness:", "PASS" if ok else "FAIL")
PY
python bench.py scan
