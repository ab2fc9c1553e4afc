"""
The first seconds of a GPU run: one tiny forward and backward per kernel family and dtype, on the
GPU, against the readable references; any failure printed whole (its traceback, Triton's
compiler message included) and the run goes on; then every kernel the GPU loaded, with its
registers, spills and shared memory as the driver reports them.

    python -m lab.gpu_smoke          # exit 1 if any case failed, 3 without a CUDA GPU
    TRITON_INTERPRET=1 python -m lab.gpu_smoke --cpu   # the same cases under the interpreter: a dry run

About 20 s, most of it compiling (18 kernel variants).
"""
import sys
import time
import traceback

import torch

import kernels

DEVICE = "cpu" if "--cpu" in sys.argv else "cuda"


def attention_case(dtype):
    q, k, v, do = (torch.randn(1, 2, 80, 64, device=DEVICE).to(dtype) for _ in range(4))
    slopes = torch.tensor([0.5, 0.25], device=DEVICE)
    grads = []
    for fn in (lambda *a: kernels.attention(*a, causal=True, alibi_slopes=slopes, impl="triton"),
               lambda *a: kernels.attention_ref(*a, causal=True, alibi_slopes=slopes)):
        x = [t.clone().requires_grad_() for t in (q, k, v)]
        o = fn(*x)
        grads.append([o, *torch.autograd.grad(o, x, do)])
    return max((a.float() - b.float()).abs().max().item() for a, b in zip(*grads))


def scan_case(dtype):
    g = torch.Generator(device=DEVICE).manual_seed(0)
    r = lambda *s: torch.randn(*s, device=DEVICE, generator=g)  # noqa: E731
    Bsz, Dm, N, L = 2, 40, 16, 70
    args = dict(u=r(Bsz, Dm, L).to(dtype), delta=r(Bsz, Dm, L).to(dtype), A=-torch.rand(Dm, N, device=DEVICE),
                B=r(Bsz, N, L).to(dtype), C=r(Bsz, N, L).to(dtype), D=r(Dm), z=r(Bsz, Dm, L).to(dtype), delta_bias=r(Dm))
    dout = r(Bsz, Dm, L).to(dtype)
    grads = []
    for impl in ("triton", "chunked"):
        x = {k: t.clone().requires_grad_() for k, t in args.items()}
        out = kernels.selective_scan(**x, impl=impl)
        grads.append([out, *torch.autograd.grad(out, list(x.values()), dout)])
    with torch.no_grad():
        kernels.selective_scan(**args, initial_state=torch.zeros(Bsz, Dm, N, device=DEVICE), return_last_state=True,
                               impl="triton")
    return max(((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-6)).item()
               for a, b in zip(*grads))


def loaded_kernels():
    """(name, compiled kernel) for every kernels.py variant compiled in this process."""
    import triton.runtime.jit as jit
    for name, fn in vars(kernels).items():
        if isinstance(fn, jit.JITFunction):
            for cache in getattr(fn, "device_caches", {}).values():
                for compiled in cache[0].values():
                    yield name, compiled


def main():
    if DEVICE == "cuda" and (not torch.cuda.is_available() or kernels.INTERPRET):
        print("gpu_smoke needs a CUDA GPU and TRITON_INTERPRET unset (or --cpu with TRITON_INTERPRET=1)", file=sys.stderr)
        return 3
    if DEVICE == "cpu" and not kernels.INTERPRET:
        print("gpu_smoke --cpu needs TRITON_INTERPRET=1", file=sys.stderr)
        return 3
    import triton
    where = torch.cuda.get_device_name() + f" (sm_{''.join(map(str, torch.cuda.get_device_capability()))})" \
        if DEVICE == "cuda" else "the CPU, under the interpreter"
    print(f"triton {triton.__version__}, torch {torch.__version__}, on {where}", flush=True)
    failed = 0
    cases = [(f"attention {d} fwd+bwd (B1 H2 T80 D64, causal, ALiBi): max abs error vs attention_ref", attention_case, d)
             for d in (torch.bfloat16, torch.float16, torch.float32)]
    cases += [(f"scan {d} fwd+bwd+no-grad (B2 D40 N16 L70): max error / max vs chunked", scan_case, d)
              for d in (torch.bfloat16, torch.float32)]
    for what, case, dtype in cases:
        t0 = time.perf_counter()
        try:
            err = case(dtype)
            if DEVICE == "cuda":
                torch.cuda.synchronize()
            print(f"ok     {what}: {err:.3g} ({time.perf_counter() - t0:.1f} s)", flush=True)
        except Exception:
            failed += 1
            print(f"FAILED {what} ({time.perf_counter() - t0:.1f} s):\n{traceback.format_exc()}", flush=True)
    print("\n| kernel | warps | stages | registers | spills | shared (B) |\n|---|---|---|---|---|---|")
    for name, k in loaded_kernels():
        md = k.metadata
        print(f"| {name} | {md.num_warps} | {md.num_stages} | {getattr(k, 'n_regs', '?')} | {getattr(k, 'n_spills', '?')} | "
              f"{md.shared} |")
    print(f"\nsmoke: {len(cases) - failed} of {len(cases)} cases ran", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
