"""
python -m lab.bench sweep: on a GPU, each kernel under the launch settings of lab.gpu_compile.SWEEP
(through KERNEL_CONFIG, the default first): attention's forward, dK dV and dQ kernels at B4 H16
T4096 D128 causal bf16, the scan at B32 D1024 N16 L2048 bf16. Each row is printed as it is
measured; the section stops, saying so, when its budget (--budget=SECONDS, default 60) is spent.
"""
import time

import torch

import kernels
from lab.bench_attention import attention_flops, matmul_tflops
from lab.bench_scan import scan_args
from lab.gpu_compile import SWEEP, kernel_config
from lab.measure import first_line, gpu_time_ms


def bench_sweep(args):
    if not torch.cuda.is_available():
        print("sweep: needs a CUDA GPU (the settings are compiled without one: python -m lab.gpu_compile --cases=sweep)")
        return
    budget = float(args.get("budget") or 60)
    end = time.monotonic() + budget
    peak = matmul_tflops()
    B, H, T, D = 4, 16, 4096, 128
    q, k, v, do = (torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    flops = attention_flops(B, H, T, D, True)
    print(f"\nlaunch-setting sweep, {torch.cuda.get_device_name()}; attention B{B} H{H} T{T} D{D} causal bf16 "
          f"(bwd: the whole backward, with the setting on the one kernel named); bf16 matmul here: {peak:.0f} TFLOP/s")
    print("| kernel | KERNEL_CONFIG | ms | TFLOP/s | share of the matmul |\n|---|---|---|---|---|", flush=True)
    for name in ("fwd", "dkdv", "dq"):
        for setting in SWEEP[name]:
            if time.monotonic() > end:
                print(f"sweep: budget of {budget:.0f} s spent, stopping before {name}={setting}", flush=True)
                return
            with kernel_config(f"{name}={setting}"):
                try:
                    if name == "fwd":
                        with torch.no_grad():
                            ms = gpu_time_ms(lambda: kernels.attention(q, k, v, impl="triton"), reps=5, target_ms=10)
                        work = flops
                    else:
                        o = kernels.attention(q, k, v, impl="triton")
                        ms = gpu_time_ms(lambda: torch.autograd.grad(o, (q, k, v), do, retain_graph=True), reps=5,
                                         target_ms=10)
                        work = 2.5 * flops
                except Exception as e:  # a setting that does not compile or does not fit: a row, not the end
                    print(f"| {name} | {name}={setting} | failed: {first_line(e)} | | |", flush=True)
                    continue
            tflops = work / ms / 1e9
            print(f"| {name} | {name}={setting} | {ms:.3f} | {tflops:.0f} | {tflops / peak:.0%} |", flush=True)
    del q, k, v, do
    Bsz, Dm, N, L = 32, 1024, 16, 2048
    a = scan_args(Bsz, Dm, N, L, "cuda", torch.bfloat16)
    grad = torch.randn(Bsz, Dm, L, device="cuda", dtype=torch.bfloat16)
    print(f"\nscan B={Bsz} D={Dm} N={N} L={L} bf16 (block_d, ckpt, warps)")
    print("| KERNEL_CONFIG | fwd ms | fwd+bwd ms |\n|---|---|---|", flush=True)
    for setting in SWEEP["scan"]:
        if time.monotonic() > end:
            print(f"sweep: budget of {budget:.0f} s spent, stopping before scan={setting}", flush=True)
            return
        with kernel_config(f"scan={setting}"):
            try:
                with torch.no_grad():
                    fwd = gpu_time_ms(lambda: kernels.selective_scan(**a, impl="triton"), reps=5, target_ms=10)
                both = gpu_time_ms(lambda: torch.autograd.grad(kernels.selective_scan(**a, impl="triton"), list(a.values()),
                                                               grad), reps=5, target_ms=10)
            except Exception as e:
                print(f"| scan={setting} | failed: {first_line(e)} | |", flush=True)
                continue
        print(f"| scan={setting} | {fwd:.3f} | {both:.3f} |", flush=True)
