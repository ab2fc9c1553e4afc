"""
python -m lab.bench scan: the selective scan's paths side by side (Blelloch, chunked, the reference loop on
the CPU or the Triton kernel on a GPU), and on the CPU the same calls while other work loads the cores.
"""
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

if not torch.cuda.is_available():  # run the Triton kernels on the CPU too (set before kernels is imported)
    os.environ.setdefault("TRITON_INTERPRET", "1")
import kernels  # noqa: E402
import model_mamba  # noqa: E402
from lab.measure import first_line, gpu_time_ms, timed_rounds, train_step  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
# The baseline: a Blelloch (work-efficient parallel prefix) scan in PyTorch, the approach of
# the popular pure-PyTorch Mamba ports. It materialises every state h (B, L, D, N), runs an
# up-sweep and a down-sweep of log2(L) levels each in place over the time axis (padded to a
# power of two), and its backward is the same scan run backwards over the adjoints.


def _blelloch_(a, x):
    """In place: x becomes h with h_t = a_t h_{t-1} + x_t along dim 1 (a power of two)."""
    L = x.size(1)
    for d in range(int(math.log2(L))):  # up-sweep: the last element of each block of 2s combines its halves
        s = 1 << d
        av, xv = a.unflatten(1, (L // (2 * s), 2 * s)), x.unflatten(1, (L // (2 * s), 2 * s))
        xv[:, :, -1].addcmul_(av[:, :, -1], xv[:, :, s - 1])
        av[:, :, -1].mul_(av[:, :, s - 1])
    for d in range(int(math.log2(L)) - 2, -1, -1):  # down-sweep: the middle of each block from the prefix before it
        s = 1 << d
        xv = x[:, 2 * s - 1:L - 1].unflatten(1, ((L - 2 * s) // (2 * s), 2 * s))
        av = a[:, 2 * s - 1:L - 1].unflatten(1, ((L - 2 * s) // (2 * s), 2 * s))
        xv[:, :, s].addcmul_(av[:, :, s], xv[:, :, 0])
    return x


class BlellochScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, x):  # (B, L, D, N) each
        L = x.size(1)
        P = 1 << math.ceil(math.log2(L)) if L > 1 else 1
        h = _blelloch_(F.pad(a, (0, 0, 0, 0, 0, P - L), value=1.0), F.pad(x, (0, 0, 0, 0, 0, P - L)))[:, :L]
        ctx.save_for_backward(a, h)
        return h

    @staticmethod
    def backward(ctx, grad_h):
        a, h = ctx.saved_tensors
        L = a.size(1)
        P = 1 << math.ceil(math.log2(L)) if L > 1 else 1
        # g_t = grad_h_t + a_{t+1} g_{t+1}: the same scan, reversed in time
        a_next = F.pad(a[:, 1:], (0, 0, 0, 0, 0, P - L + 1), value=0.0).flip(1)
        g = _blelloch_(a_next, F.pad(grad_h, (0, 0, 0, 0, 0, P - L)).flip(1)).flip(1)[:, :L]
        return g * F.pad(h[:, :-1], (0, 0, 0, 0, 1, 0)), g  # d a_t = g_t h_{t-1}, d x_t = g_t


def selective_scan_blelloch(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=True):
    out_dtype = u.dtype
    u, dt, A, B, C, D, z = kernels._scan_inputs(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    a = torch.exp(dt.transpose(1, 2)[:, :, :, None] * A)  # (B, L, D, N)
    x = (dt * u).transpose(1, 2)[:, :, :, None] * B.transpose(1, 2)[:, :, None, :]  # (B, L, D, N)
    h = BlellochScan.apply(a, x)  # (B, L, D, N)
    y = torch.einsum("bldn,bnl->bdl", h, C)  # (B, D, L)
    return kernels._scan_output(y, u, D, z, out_dtype)


def scan_args(Bsz, Dm, N, L, dev, dtype):
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)
    args = dict(u=r(Bsz, Dm, L).to(dtype), delta=(r(Bsz, Dm, L) - 2).to(dtype), A=-torch.rand(Dm, N, generator=g) * 8,
                B=r(Bsz, N, L).to(dtype), C=r(Bsz, N, L).to(dtype), D=r(Dm), z=r(Bsz, Dm, L).to(dtype), delta_bias=r(Dm) * 0.1)
    return {k: v.to(dev).requires_grad_() for k, v in args.items()}


def bench_scan(args):
    """Selective scan forward and forward+backward, every path side by side, rounds interleaved.
    CPU: B=8, D=256, N=16, L in (256, 1024), float32. CUDA: B=32, D=1024, N=16, L=2048, bf16 inputs."""
    # Decays multiply down to subnormal floats, which x86 CPUs process up to ~100x slower:
    # flush them to zero (all paths alike; GPUs flush by default).
    torch.set_flush_denormal(True)
    if torch.cuda.is_available():
        return bench_scan_gpu()
    dev = "cpu"
    Bsz, Dm, N, Ls, dtype = 8, 256, 16, (256, 1024), torch.float32
    paths = {"blelloch": selective_scan_blelloch,
             "chunked": lambda **a: kernels.selective_scan(**a, impl="chunked"),
             "ref": lambda **a: kernels.selective_scan(**a, impl="ref")}
    print(f"\nselective scan, CPU, {torch.get_num_threads()} threads: B={Bsz} D={Dm} N={N}, {str(dtype)[6:]} inputs, "
          "median of 5 interleaved rounds")
    print("| path | L | fwd ms | fwd+bwd ms | fwd+bwd speed-up over Blelloch |\n|---|---|---|---|---|")
    res, failed = {}, {}
    nan = (float("nan"), float("nan"))
    for L in Ls:
        a = scan_args(Bsz, Dm, N, L, dev, dtype)
        grad = torch.randn(Bsz, Dm, L, device=dev, dtype=dtype)
        fns = {}
        for name, fn in paths.items():
            fwd = lambda fn=fn: torch.no_grad()(fn)(**a)  # noqa: E731
            fb = lambda fn=fn: torch.autograd.grad(fn(**a), list(a.values()), grad)  # noqa: E731
            try:  # one call of each first: a path that fails (a Triton compile error, say) gets a failed row
                fwd()
                fb()
            except Exception as e:
                failed[name, L] = first_line(e)
                continue
            fns[name, "fwd"], fns[name, "fb"] = fwd, fb
        secs = timed_rounds(fns, rounds=5, steps=1)
        for name in paths:
            if (name, L) in failed:
                print(f"| {name} | {L} | failed: {failed[name, L]} | - | - |")
                continue
            res[name, L] = secs[name, "fwd"] * 1e3, secs[name, "fb"] * 1e3
            print(f"| {name} | {L} | {res[name, L][0]:.1f} | {res[name, L][1]:.1f} | "
                  f"{res.get(('blelloch', L), nan)[1] / res[name, L][1]:.2f}x |")
    for L in Ls:
        x = res.get(("blelloch", L), nan)[1] / res.get(("chunked", L), nan)[1]
        print(f"target: chunked fwd+bwd >= 2x Blelloch at L={L}: {x:.2f}x {'PASS' if x >= 2 else 'FAIL'}")
    scan_under_load(a, grad, paths, Bsz, Dm, N, Ls[-1])


def bench_scan_gpu(Bsz=32, Dm=1024, N=16, L=2048, dtype=torch.bfloat16):
    """The CUDA side of bench_scan: each path timed on its own and its row printed at once,
    fastest first (Blelloch, the slowest, last), then the targets."""
    paths = {"triton": lambda **a: kernels.selective_scan(**a, impl="triton"),
             "chunked": lambda **a: kernels.selective_scan(**a, impl="chunked"),
             "blelloch": selective_scan_blelloch}
    print(f"\nselective scan, {torch.cuda.get_device_name()}: B={Bsz} D={Dm} N={N} L={L}, {str(dtype)[6:]} inputs, "
          "median of 10 CUDA-event timings of back-to-back calls")
    print("| path | fwd ms | fwd+bwd ms |\n|---|---|---|", flush=True)
    a = scan_args(Bsz, Dm, N, L, "cuda", dtype)
    grad = torch.randn(Bsz, Dm, L, device="cuda", dtype=dtype)
    res = {}
    for name, fn in paths.items():
        try:  # a path that fails (a Triton compile error, out of memory) gets a failed row
            fwd = gpu_time_ms(lambda: torch.no_grad()(fn)(**a))
            both = gpu_time_ms(lambda: torch.autograd.grad(fn(**a), list(a.values()), grad))
        except Exception as e:
            print(f"| {name} | failed: {first_line(e)} | - |", flush=True)
            torch.cuda.empty_cache()
            continue
        res[name] = fwd, both
        print(f"| {name} | {fwd:.2f} | {both:.2f} |", flush=True)
    nan = (float("nan"), float("nan"))
    for name in ("triton", "chunked"):
        print(f"fwd+bwd speed-up of {name} over Blelloch: {res.get('blelloch', nan)[1] / res.get(name, nan)[1]:.2f}x")
    src = torch.empty(2 ** 30, device="cuda", dtype=torch.uint8)  # 1 GiB
    dst = torch.empty_like(src)
    hbm = 2 * src.numel() / (gpu_time_ms(lambda: dst.copy_(src)) / 1e3) / 1e9
    nbytes = (4 * Bsz * Dm * L + 2 * Bsz * N * L) * a["u"].element_size()  # u, delta, z read, out written; B, C read
    bw = nbytes / (res.get("triton", nan)[0] / 1e3) / 1e9
    print(f"HBM copy bandwidth {hbm:.0f} GB/s; the Triton forward moves {nbytes / 1e9:.2f} GB at {bw:.0f} GB/s")
    print(f"target: Triton forward >= 50% of HBM bandwidth: {bw / hbm:.0%} {'PASS' if bw >= 0.5 * hbm else 'FAIL'}")
    x = res.get("chunked", nan)[1] / res.get("triton", nan)[1]
    print(f"target: Triton fwd+bwd >= 5x the chunked algorithm on this GPU: {x:.1f}x {'PASS' if x >= 5 else 'FAIL'}")


class CpuLoad:
    """Other work on the same cores, started and stopped here: a default `train.py --model=mamba`
    run on torch's default 2 threads and a niced single-threaded busy loop, the situation of a
    shared machine where a scan on 2 intra-op threads once took 38 s instead of 0.2 s."""

    def __enter__(self):
        tmp = tempfile.mkdtemp()
        env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONUNBUFFERED": "1"}
        self.procs = [subprocess.Popen([sys.executable, "train.py", "--model=mamba", "--max_iters=100000", "--eval_interval=100000",
                                        f"--out_dir={tmp}", f"--data_dir={tmp}"], cwd=REPO,
                                       env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True),
                      subprocess.Popen(["nice", "-n", "10", sys.executable, "-c", "while True: pass"])]
        for line in self.procs[0].stdout:  # wait until it trains: its first logged step
            if line.startswith("iter "):
                break
        if self.procs[0].poll() is not None:
            raise RuntimeError("the background training run stopped")
        return self

    def __exit__(self, *exc):
        for p in self.procs:
            p.kill()
            p.wait()


def scan_under_load(a, grad, paths, Bsz, Dm, N, L):
    """The same calls, wall time, with the machine idle (as far as this process can tell) and while
    CpuLoad runs; then one whole Mamba training step (default Config, batch 12) the same way."""
    model = model_mamba.Model(model_mamba.Config(vocab_size=512))
    fns = {name: lambda fn=fn: torch.autograd.grad(paths[name](**a), list(a.values()), grad) for name, fn in paths.items()
           if name != "ref"}
    fns["mamba train step"] = train_step(model, 12, model.config.block_size, 512)
    idle = timed_rounds(fns, rounds=3, steps=1)
    with CpuLoad():
        loaded = timed_rounds(fns, rounds=3, steps=1)
    print(f"\nidle vs loaded (a 2-thread Mamba training and a niced busy loop on the same cores), wall time, "
          f"{torch.get_num_threads()} threads, median of 3; fwd+bwd at L={L}")
    print("| what | idle ms | loaded ms | loaded / idle |\n|---|---|---|---|")
    for name in fns:
        print(f"| {name} | {idle[name] * 1e3:.0f} | {loaded[name] * 1e3:.0f} | {loaded[name] / idle[name]:.1f}x |")
    x = loaded["chunked"] / idle["chunked"]
    print(f"target: chunked fwd+bwd loaded within 5x of idle: {x:.1f}x {'PASS' if x <= 5 else 'FAIL'}")
