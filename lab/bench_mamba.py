"""
python -m lab.bench mamba: Mamba against the Transformer at equal parameters, training on the CPU, and
where Mamba's step goes: the scan's share, and the scan's memory traffic against this machine's bandwidth.
"""
import inspect
import os
import time

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

if not torch.cuda.is_available():  # run the Triton kernels on the CPU too (set before kernels is imported)
    os.environ.setdefault("TRITON_INTERPRET", "1")
import kernels  # noqa: E402
import model_mamba  # noqa: E402
import model_transformer  # noqa: E402
from lab.bench_scan import CpuLoad, scan_args  # noqa: E402
from lab.measure import timed_rounds, train_step  # noqa: E402


class ByteCounter(TorchDispatchMode):
    """Bytes that the aten operations run inside read and write: every tensor argument and every
    output counted over the memory it spans (a slice its part, a broadcast its data once), views
    and empty tensors free. An operation writing into an `out=` buffer counts it twice, as a cache
    does (it reads each line before writing it)."""

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view:
            tensors = [t for t in torch.utils._pytree.tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor)]
            self.bytes += sum(span_bytes(t) for t in tensors)
        return out


def span_bytes(t):
    if t.numel() == 0:
        return 0
    return t.element_size() * (1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride())))


def bench_mamba(args):
    """Mamba against the Transformer at equal parameters on the CPU, training at the default shape
    (batch 12, context 256, the built-in corpus's 103 characters): the Transformer at its defaults,
    Mamba at d_model 160 (0.75M parameters each). Then where Mamba's step goes: the step with the
    scan replaced by a cheap stand-in, the scan alone at the layer's shape, and the scan's memory
    traffic (bytes its operations read and write) against the bandwidth that the same kind of
    operation reaches here, measured in the same run. Idle as the machine is, then under CpuLoad."""
    B, T, V = 12, 256, 103
    torch.manual_seed(0)
    tr = model_transformer.Model(model_transformer.Config(vocab_size=V))
    mb = model_mamba.Model(model_mamba.Config(vocab_size=V, d_model=160))
    cfg = mb.config
    a = scan_args(B, cfg.d_inner, cfg.d_state, T, "cpu", torch.float32)
    grad = torch.randn(B, cfg.d_inner, T)
    scan = lambda: torch.autograd.grad(kernels.selective_scan(**a, impl="chunked"), list(a.values()), grad)  # noqa: E731
    mamba_step, real = train_step(mb, B, T, V), kernels.selective_scan

    def stand_in(u, delta, A, B, C, D=None, z=None, delta_bias=None, **kw):  # every input used, O(B I L) work
        return (u * D[:, None] + delta + delta_bias[:, None] + (B + C).sum(1, keepdim=True) + A.sum()) * F.silu(z)

    def without_scan():
        kernels.selective_scan = stand_in
        try:
            mamba_step()
        finally:
            kernels.selective_scan = real
    P = inspect.signature(kernels.selective_scan_chunked).parameters["chunk_size"].default
    chunk = torch.rand(P, B, cfg.d_inner, cfg.d_state)  # one chunk of states: the size the scan's operations stream
    other, out = torch.rand_like(chunk), torch.empty_like(chunk)
    fns = {"Transformer (defaults)": train_step(tr, B, T, V), "Mamba, d_model 160": mamba_step,
           "Mamba, scan replaced by a stand-in": without_scan, "one scan, fwd+bwd": scan,
           "stream": lambda: torch.mul(chunk, other, out=out)}
    big, big_out = torch.rand(2 ** 26), torch.empty(2 ** 26)  # 256 MiB each: past every cache, DRAM's rate
    fns["copy"] = lambda: big_out.copy_(big)
    with ByteCounter() as c:
        scan()
    scan_bytes = c.bytes
    with ByteCounter() as c:
        fns["stream"]()
    stream_bytes = c.bytes
    with ByteCounter() as c:
        fns["copy"]()
    copy_bytes = c.bytes
    # the least a scan must move: its inputs and output, their gradients, the state and its gradient, once
    least = sum(span_bytes(t) for t in a.values()) * 2 + 2 * span_bytes(grad)
    n_params = {k: sum(p.numel() for p in m.parameters()) for k, m in (("Transformer (defaults)", tr), ("Mamba, d_model 160", mb))}
    print(f"\nMamba vs Transformer, CPU training, batch {B} x context {T}, {torch.get_num_threads()} thread(s), "
          f"CPU time of this process, median of 3 interleaved rounds")
    for load in ("as the machine is", "under CpuLoad (a 2-thread Mamba training and a busy loop on the same cores)"):
        if load.startswith("under"):
            with CpuLoad():
                secs = timed_rounds(fns, rounds=3, steps=2, clock=time.process_time)
        else:
            secs = timed_rounds(fns, rounds=3, steps=2, clock=time.process_time)
        tf, mm = secs["Transformer (defaults)"], secs["Mamba, d_model 160"]
        scan_s, bw = secs["one scan, fwd+bwd"], stream_bytes / secs["stream"]
        print(f"\n{load}:\n| what | params | CPU ms | tokens/s |\n|---|---|---|---|")
        for name in ("Transformer (defaults)", "Mamba, d_model 160", "Mamba, scan replaced by a stand-in"):
            n = n_params.get(name)
            print(f"| {name} | {f'{n / 1e6:.2f}M' if n else ''} | {secs[name] * 1e3:.1f} | {B * T / secs[name]:,.0f} |")
        print(f"| one scan at the layer's shape (B={B} I={cfg.d_inner} N={cfg.d_state} L={T}), fwd+bwd | | "
              f"{scan_s * 1e3:.1f} | |")
        print(f"Mamba / Transformer tokens/s: {tf / mm:.2f}x; the {cfg.n_layer} scans are "
              f"{cfg.n_layer * scan_s / mm:.0%} of Mamba's step (the stand-in step: {1 - secs['Mamba, scan replaced by a stand-in'] / mm:.0%})")
        print(f"bandwidth: an elementwise multiply of one chunk of states ({span_bytes(chunk) / 2 ** 20:.1f} MiB) moves "
              f"{bw / 1e9:.1f} GB/s; the scan's operations move {scan_bytes / 1e6:.0f} MB per fwd+bwd, "
              f"{scan_bytes / bw * 1e3:.1f} ms at that rate: the scan takes {scan_s * bw / scan_bytes:.2f}x that bound "
              f"(its {scan_bytes / scan_s / 1e9:.1f} GB/s); inputs, output and gradients once would be {least / 1e6:.0f} MB "
              f"({least / bw * 1e3:.1f} ms)")
        dram = copy_bytes / secs["copy"]
        print(f"a 256 MiB copy moves {dram / 1e9:.1f} GB/s: at that rate the scan's traffic takes {scan_bytes / dram * 1e3:.1f} ms "
              f"(the scan {scan_s * dram / scan_bytes:.2f}x that)")
        x = tf / mm
        print(f"target: Mamba >= 0.5x the Transformer's tokens/s: {x:.2f}x {'PASS' if x >= 0.5 else 'FAIL'}; "
              f"or the scan within 1.5x of its bandwidth bound: {scan_s * bw / scan_bytes:.2f}x "
              f"{'PASS' if scan_s * bw / scan_bytes <= 1.5 else 'FAIL'}")
