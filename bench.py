"""
Benchmarks, one section per command-line word:

    python bench.py scan      selective scan, forward and forward+backward, every path
    python bench.py decode    time per generated token and cache memory, Mamba vs Transformer

On a CUDA machine the sections use GPU sizes and the Triton kernel; elsewhere CPU sizes.
Ratios are measured side by side in one run. Each section prints a table and, where the
issue sets a target, a PASS/FAIL line.
"""
import math
import sys
import time

import torch
import torch.nn.functional as F

import kernels
import model_mamba
import model_transformer


def timed(fn, sync, reps):
    """Best wall time of fn() in ms, after one warm-up call: on a shared machine the minimum
    is the figure least disturbed by other work."""
    fn()
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return 1e3 * min(times)


def device_setup():
    # Decays multiply down to subnormal floats, which x86 CPUs process ~100x slower: flush them
    # to zero (all paths alike; GPUs do this by default).
    torch.set_flush_denormal(True)
    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    name = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} thread(s)"
    return dev, name, (torch.cuda.synchronize if cuda else (lambda: None))


# ----------------------------------------------------------------------------- scan
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


def bench_scan():
    dev, name, sync = device_setup()
    cuda = dev.type == "cuda"
    Bsz, Dm, N, Ls, dtype = (32, 1024, 16, (2048,), torch.bfloat16) if cuda else (8, 256, 16, (256, 1024), torch.float32)
    paths = {"blelloch": selective_scan_blelloch,
             "chunked": lambda **a: kernels.selective_scan(**a, impl="chunked"),
             "ref": lambda **a: kernels.selective_scan(**a, impl="ref")}
    if cuda:
        paths["triton"] = lambda **a: kernels.selective_scan(**a, impl="triton")
    reps = 5
    print(f"selective scan on {name}: B={Bsz} D={Dm} N={N} {str(dtype).replace('torch.', '')} inputs, ms (best of {reps})")
    print(f"{'path':>9} {'L':>5} {'fwd':>9} {'fwd+bwd':>9} {'fwd+bwd vs blelloch':>20}")
    res = {}
    for L in Ls:
        args = scan_args(Bsz, Dm, N, L, dev, dtype)
        grad = torch.randn(Bsz, Dm, L, device=dev, dtype=dtype)
        for pname, fn in paths.items():
            if pname == "ref" and cuda:
                continue  # 2048 Python steps per call: minutes, and nothing to learn from it here
            with torch.no_grad():
                fwd = timed(lambda: fn(**args), sync, reps)
            fb = timed(lambda: torch.autograd.grad(fn(**args), list(args.values()), grad), sync, reps)
            res[pname, L] = (fwd, fb)
            print(f"{pname:>9} {L:>5} {fwd:9.1f} {fb:9.1f} {res['blelloch', L][1] / fb:19.2f}x", flush=True)
    for L in Ls:
        if cuda:
            break
        speedup = res["blelloch", L][1] / res["chunked", L][1]
        print(f"target L={L}: chunked fwd+bwd >= 2x Blelloch: {speedup:.2f}x {'PASS' if speedup >= 2 else 'FAIL'}")
    if cuda:
        L = Ls[0]
        copy_src = torch.empty(2 ** 30, device=dev, dtype=torch.uint8)  # 1 GiB
        copy_dst = torch.empty_like(copy_src)
        hbm = 2 * copy_src.numel() / timed(lambda: copy_dst.copy_(copy_src), sync, reps) / 1e6  # GB/s, read + write
        nbytes = (4 * Bsz * Dm * L + 2 * Bsz * N * L) * args["u"].element_size()  # u, delta, z, out; B, C
        bw = nbytes / res["triton", L][0] / 1e6
        print(f"HBM copy bandwidth {hbm:.0f} GB/s; Triton forward moves {nbytes / 1e9:.2f} GB at {bw:.0f} GB/s")
        print(f"target: Triton forward >= 50% of HBM bandwidth: {bw / hbm:.0%} {'PASS' if bw >= 0.5 * hbm else 'FAIL'}")
        speedup = res["chunked", L][1] / res["triton", L][1]
        print(f"target: Triton fwd+bwd >= 5x the chunked algorithm on this GPU: {speedup:.1f}x {'PASS' if speedup >= 5 else 'FAIL'}")


# ----------------------------------------------------------------------------- decode


def bench_decode(contexts=(64, 256, 1024, 4096), steps=32, rounds=5):
    dev, name, sync = device_setup()
    torch.manual_seed(0)
    common = dict(vocab_size=512, d_model=256, n_layer=4, block_size=max(contexts) + steps * rounds)
    models = {"mamba": model_mamba.Model(model_mamba.Config(**common)),
              "transformer": model_transformer.Model(model_transformer.Config(**common, n_head=8, n_kv_head=2))}
    print(f"decode on {name}: batch 1, d_model 256, 4 layers, vocab 512; transformer with GQA 8 query / 2 KV heads")
    print(f"ms/token: best of {rounds} rounds of {steps} tokens after a prefill of `context` tokens")
    print(f"{'model':>12} {'context':>8} {'ms/token':>9} {'cache MiB':>10}")
    res = {}
    for mname, m in models.items():
        m.to(dev).eval()
        for ctx in contexts:
            tok = torch.randint(0, 512, (1, 1), device=dev)
            with torch.no_grad():
                cache = m.new_cache(1, max_len=ctx + steps * rounds)
                m(torch.randint(0, 512, (1, ctx), device=dev), cache=cache)  # prefill, not timed
                times = []
                for _ in range(rounds):
                    sync()
                    t0 = time.perf_counter()
                    for _ in range(steps):
                        m(tok, cache=cache)
                    sync()
                    times.append((time.perf_counter() - t0) / steps * 1e3)
            res[mname, ctx] = (min(times), m.cache_bytes(m.new_cache(1, max_len=ctx)))  # holding `context` tokens
            print(f"{mname:>12} {ctx:>8} {res[mname, ctx][0]:9.2f} {res[mname, ctx][1] / 2 ** 20:10.3f}", flush=True)
    lo, hi = res["mamba", contexts[0]], res["mamba", contexts[-1]]
    ratio = hi[0] / lo[0]
    print(f"target: Mamba ms/token at {contexts[-1]} within 1.3x of {contexts[0]}: {ratio:.2f}x {'PASS' if ratio <= 1.3 else 'FAIL'}")
    print(f"target: Mamba cache memory constant: {lo[1]} vs {hi[1]} bytes {'PASS' if lo[1] == hi[1] else 'FAIL'}")


SECTIONS = {"scan": bench_scan, "decode": bench_decode}

if __name__ == "__main__":
    names = sys.argv[1:] or list(SECTIONS)
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        sys.exit(f"unknown section {unknown[0]!r}; choose from {' '.join(SECTIONS)}")
    for n in names:
        SECTIONS[n]()
        print()
