"""
python -m lab.bench attention: FlashAttention on a GPU (TFLOP/s and peak memory of the Triton kernel against
PyTorch's SDPA and the explicit formula, with the kernels' targets), or on the CPU its memory against T.
"""
import os

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

if not torch.cuda.is_available():  # run the Triton kernels on the CPU too (set before kernels is imported)
    os.environ.setdefault("TRITON_INTERPRET", "1")
import kernels  # noqa: E402
from lab.measure import attention_fwd_bwd, attention_inputs, cuda_peak_mib, first_line, gpu_time_ms, lowest_peak, \
    machine, table, warm_up_attention  # noqa: E402


# FLOPs as the FlashAttention papers count them: two matmuls of 2*Tq*Tk*D each per head,
# halved when causal; the backward does 2.5x the forward's matmul work.

def attention_flops(B, H, T, D, causal):
    return 4 * B * H * T * T * D / (2 if causal else 1)




def sdpa(backend):
    def run(q, k, v, causal):
        if backend is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return run


def matmul_tflops(device="cuda", n=8192):
    """TFLOP/s of one bf16 (n x n) @ (n x n) matmul here: what this GPU's tensor cores reach in
    practice, the ceiling the kernels' TFLOP/s are a share of (NaN off CUDA)."""
    if device != "cuda":
        return float("nan")
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    return 2 * n ** 3 / gpu_time_ms(lambda: a @ b) / 1e9


def attention_gpu(shapes=((16, 12, 1024, 64, True), (4, 16, 4096, 128, True), (2, 16, 8192, 128, True),
                           (4, 16, 4096, 128, False)), device="cuda", impls=None):
    """shapes: (B, H, T, D, causal): the nanoGPT shape, then long sequences at D=128. Each row is
    printed as soon as it is measured; the slowest implementation comes last."""
    impls = impls or {
        "triton": lambda q, k, v, causal: kernels.attention(q, k, v, causal=causal, impl="triton"),
        "sdpa-flash": sdpa(SDPBackend.FLASH_ATTENTION),
        "sdpa-default": sdpa(None),
        "explicit": lambda q, k, v, causal: kernels.attention_ref(q, k, v, causal=causal),
    }
    peak_tflops = matmul_tflops(device)
    print(f"attention, bf16, TFLOP/s (fwd 4*B*H*T*T*D, halved causal; bwd 2.5x) and peak extra memory of fwd+bwd; "
          f"a bf16 8192^3 matmul here: {peak_tflops:.0f} TFLOP/s")
    header = ["shape", "mask", "impl", "fwd", "bwd", "fwd+bwd", "fwd+bwd / matmul", "peak MiB", "note"]
    print(table(header, []), flush=True)
    results = {}
    for B, H, T, D, causal in shapes:
        q, k, v, do = (torch.randn(B, H, T, D, device=device, dtype=torch.bfloat16) for _ in range(4))
        q, k, v = (x.requires_grad_() for x in (q, k, v))
        flops = attention_flops(B, H, T, D, causal)
        for name, fn in impls.items():
            cells = [f"B{B} H{H} T{T} D{D}", "causal" if causal else "full", name]
            try:
                with torch.no_grad():
                    fwd = gpu_time_ms(lambda: fn(q, k, v, causal))
                o = fn(q, k, v, causal)
                bwd = gpu_time_ms(lambda: torch.autograd.grad(o, (q, k, v), do, retain_graph=True))
                del o
                both = gpu_time_ms(lambda: torch.autograd.grad(fn(q, k, v, causal), (q, k, v), do))
                peak = cuda_peak_mib(lambda: torch.autograd.grad(fn(q, k, v, causal), (q, k, v), do))
            except Exception as e:  # no flash backend for this shape, a Triton compile error, out of memory ...
                print(table(header, [cells + ["-"] * 5 + ["failed: " + first_line(e)]]).splitlines()[-1], flush=True)
                if device == "cuda":
                    torch.cuda.empty_cache()
                continue
            r = dict(fwd=flops / fwd / 1e9, bwd=2.5 * flops / bwd / 1e9, both=3.5 * flops / both / 1e9, peak=peak)
            results[(B, H, T, D, causal, name)] = r
            share = f"{r['both'] / peak_tflops:.0%}" if peak_tflops == peak_tflops else "-"
            print(table(header, [cells + [f"{r['fwd']:.0f}", f"{r['bwd']:.0f}", f"{r['both']:.0f}", share,
                                          f"{peak:.0f}", ""]]).splitlines()[-1], flush=True)
        del q, k, v, do
        if device == "cuda":
            torch.cuda.empty_cache()
    print()
    attention_targets(results)


def attention_targets(res):
    """The kernels' targets on an H200, each PASS or FAIL (a missing measurement is a FAIL)."""
    def get(shape, name, key):
        return res.get((*shape, name), {}).get(key, float("nan"))
    rows = []

    def check(what, value, goal, unit):
        rows.append([what, f"{value:.2f}{unit}", f">= {goal}{unit}", "PASS" if value >= goal else "FAIL"])
    check("fwd D=64 causal T=1024 (B16 H12)", get((16, 12, 1024, 64, True), "triton", "fwd"), 250, " TFLOP/s")
    for shape in [(4, 16, 4096, 128, True), (2, 16, 8192, 128, True)]:
        t = f"T={shape[2]} (B{shape[0]} H{shape[1]})"
        check(f"fwd D=128 causal {t}", get(shape, "triton", "fwd"), 380, " TFLOP/s")
        check(f"fwd D=128 causal {t} vs sdpa-flash",
              get(shape, "triton", "fwd") / get(shape, "sdpa-flash", "fwd"), 1.1, "x")
        check(f"bwd D=128 causal {t} vs sdpa-flash",
              get(shape, "triton", "bwd") / get(shape, "sdpa-flash", "bwd"), 1.0, "x")
    shape = (4, 16, 4096, 128, False)
    check("bwd D=128 full T=4096 (B4 H16) vs sdpa-flash",
          get(shape, "triton", "bwd") / get(shape, "sdpa-flash", "bwd"), 1.0, "x")
    print("targets (on an H200; dK/dV determinism is a test: see lab/gpu_check.sh)")
    print(table(["target", "measured", "goal", ""], rows) + "\n")




def attention_cpu_memory(H=4, D=64, lengths=(256, 512, 1024, 2048, 4096), interpreter_up_to=2048):
    """Forward+backward of causal attention (B=1, fp32) at growing T. The explicit formula keeps
    (H, T, T) score and probability matrices; the tiled paths hold O(T) plus a tile. Measured
    as peak resident memory (Linux VmHWM) above the memory before the call."""
    paths = {
        "explicit (attention_ref)": lambda q, k, v: kernels.attention_ref(q, k, v, causal=True),
        "torch SDPA (CPU flash kernel)": lambda q, k, v: kernels.attention(q, k, v, causal=True, impl="torch"),
        # ALiBi reaches SDPA as a (1, H, T, T) float mask: still the flash kernel (a 3-D mask is not),
        # but the mask itself is one (H, T, T) matrix
        "torch SDPA + ALiBi mask": lambda q, k, v: kernels.attention(q, k, v, causal=True, alibi_slopes=slopes,
                                                                     impl="torch"),
    }
    slopes = 2.0 ** (-8.0 * torch.arange(1, H + 1) / H)  # the ALiBi paper's slopes
    if kernels.INTERPRET:
        paths["Triton kernel (interpreter)"] = lambda q, k, v: kernels.attention(q, k, v, causal=True, impl="triton")
    warm_up_attention(paths, H, lengths[0], D)
    rows = []
    for T in lengths:
        row = [T, f"{H * T * T * 4 / 2**20:.0f}"]
        for name, fn in paths.items():
            if "interpreter" in name and T > interpreter_up_to:
                row += ["-", "-"]
                continue
            q, k, v, do = attention_inputs(H, T, D)
            mib, secs = lowest_peak(attention_fwd_bwd(fn, q, k, v, do), repeats=1 if "interpreter" in name else 2)
            row += [f"{mib:.0f}", f"{secs:.2f}"]
            del q, k, v, do
        rows.append(row)
    print(f"attention, CPU peak memory of fwd+bwd, causal, B=1 H={H} D={D} fp32 ({machine()})")
    print("method: peak resident set size (Linux VmHWM, reset via /proc/self/clear_refs) above the RSS")
    print("before the call (lower of two runs; one for the interpreter), which includes the inputs'")
    print("gradients (3 x T KiB); s = wall seconds (the interpreter's are no speed figure: numpy, one core).")
    header = ["T", "one (H,T,T) fp32 MiB"]
    for name in paths:
        header += [f"{name} MiB", "s"]
    print(table(header, rows) + "\n")


def attention(args):
    print(machine(), "\n")
    if torch.cuda.is_available():
        attention_gpu()
    else:
        attention_cpu_memory()
