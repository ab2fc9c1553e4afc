"""
Benchmarks: speed and memory, measured side by side in one process. These are not tests: the
figures depend on the machine, so they are reported as ratios between things run together.

    python bench.py                          # every section
    python bench.py train generate           # some of them
    python bench.py train --nanogpt=PATH     # also time nanoGPT's model.py from a checkout at PATH
    python bench.py scan decode              # selective scan paths; Mamba state vs KV cache
    python bench.py attention                # FlashAttention: GPU TFLOP/s; CPU memory against length
    python bench.py hybrid                   # cache memory: Transformer vs Jamba-style hybrid vs Mamba
    python bench.py moe                      # grouped experts vs the loop vs a dense feed-forward

On a CUDA machine `scan` uses GPU sizes and the Triton kernel.
Sections with a target print PASS/FAIL lines.
"""
import ctypes
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

if not torch.cuda.is_available():  # run the Triton kernels on the CPU too (set before kernels is imported)
    os.environ.setdefault("TRITON_INTERPRET", "1")
import kernels  # noqa: E402
import model_hybrid
import model_mamba
import model_moe
import model_transformer

NANOGPT_SHAPE = dict(vocab_size=65, block_size=64, d_model=128, n_layer=4, n_head=4)  # its CPU recipe
GPT2_STYLE = dict(pos="learned", norm="layernorm", ffn="gelu", bias=False, n_kv_head=4)  # = config/gpt2_style.py


def timed_rounds(fns, rounds=5, steps=10, clock=time.perf_counter):
    """Run each fn `steps` times per round, rounds interleaved so that load from other processes
    falls on all of them alike; return the median seconds per call of each. On a shared CPU,
    clock=time.process_time counts only the CPU time this process used, which other jobs
    disturb far less than wall time."""
    for fn in fns.values():
        fn()  # warm up
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = clock()
            for _ in range(steps):
                fn()
            times[name].append((clock() - t0) / steps)
    return {name: statistics.median(t) for name, t in times.items()}


def gpu_time_ms(fn, reps=10, target_ms=20.0):
    """GPU milliseconds per call of fn: median over reps CUDA-event pairs, each around a batch of
    back-to-back calls sized to take about target_ms, after warm-up calls (which also compile
    Triton). Within a batch the CPU queues the next launches while the GPU works, so the Python
    wrapper and launch overhead of one call overlaps the kernels of the previous one instead of
    counting as kernel time. The same for every implementation timed with it."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    calls = max(1, min(200, int(target_ms / max(start.elapsed_time(end), 1e-3))))
    times = []
    for _ in range(reps):
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return statistics.median(times)


def first_line(e):
    """An exception as one short line for a table cell: a Triton compile or resource error from one
    implementation must not hide the other implementations' rows."""
    msg = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {msg}"[:100]


def train_step(model, batch_size, block_size, vocab_size):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, vocab_size, (batch_size, block_size))
    y = torch.randint(0, vocab_size, (batch_size, block_size))

    def step():
        _, loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def bench_train(args):
    """Training tokens/s at nanoGPT's CPU shape (batch 12, context 64): GPT-2-style against the
    modern default, and against nanoGPT's own model.py when --nanogpt=PATH points at a checkout."""
    B, T = 12, NANOGPT_SHAPE["block_size"]
    models = {
        "gpt2-style (learned, LayerNorm, GELU, MHA)": model_transformer.Model(model_transformer.Config(**NANOGPT_SHAPE, **GPT2_STYLE)),
        "modern default (RoPE, RMSNorm, SwiGLU, GQA 4:2)": model_transformer.Model(model_transformer.Config(**NANOGPT_SHAPE)),
    }
    if args.get("nanogpt"):
        sys.path.insert(0, args["nanogpt"])
        import model as nanogpt  # noqa: E402  (their file, imported from their checkout, not copied here)
        cfg = nanogpt.GPTConfig(block_size=T, vocab_size=65, n_layer=4, n_head=4, n_embd=128, dropout=0.0, bias=False)
        models["nanoGPT model.py (same shape)"] = nanogpt.GPT(cfg)
    secs = timed_rounds({name: train_step(m, B, T, 65) for name, m in models.items()}, clock=time.process_time)
    base = secs[next(iter(models))]
    print(f"\ntraining step, batch {B} x context {T}, float32, {torch.get_num_threads()} threads, CPU time of this process")
    print("| model | params | CPU ms/step | tokens per CPU-second | relative to gpt2-style |\n|---|---|---|---|---|")
    for name, s in secs.items():
        n = sum(p.numel() for p in models[name].parameters())
        print(f"| {name} | {n / 1e6:.2f}M | {s * 1e3:.1f} | {B * T / s:,.0f} | {base / s:.2f}x |")


@torch.no_grad()
def bench_generate(args):
    """Time per new token at a 1024-token context: one step against the KV cache against
    recomputing the whole context (what generation without a cache does)."""
    ctx = 1024
    model = model_transformer.Model(model_transformer.Config(vocab_size=65, block_size=ctx + 1)).eval()
    idx = torch.randint(0, 65, (1, ctx))
    cache = model.new_cache(1)
    model(idx, cache=cache)  # prefill: the cache now holds 1024 positions
    tok = idx[:, -1:]

    def cached():
        model(tok, cache=cache)
        cache.len -= 1  # stay at 1024, so every call measures the same step

    secs = timed_rounds({"cached": cached, "recompute": lambda: model(idx)}, rounds=5, steps=5, clock=time.process_time)
    print(f"\nnext token at context {ctx} (modern default, {model.num_params() / 1e6:.2f}M params, batch 1)")
    print("| method | CPU ms/token | speed-up |\n|---|---|---|")
    print(f"| recompute the context | {secs['recompute'] * 1e3:.2f} | 1.0x |")
    print(f"| KV cache | {secs['cached'] * 1e3:.2f} | {secs['recompute'] / secs['cached']:.1f}x |")
    print(f"KV cache: {model.cache_bytes(cache) / 2**20:.2f} MiB for {ctx + 1} positions "
          f"({model.config.n_kv_head} of {model.config.n_head} heads stored)")


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


def bench_scan(args):
    """Selective scan forward and forward+backward, every path side by side, rounds interleaved.
    CPU: B=8, D=256, N=16, L in (256, 1024), float32. CUDA: B=32, D=1024, N=16, L=2048, bf16 inputs."""
    # Decays multiply down to subnormal floats, which x86 CPUs process up to ~100x slower:
    # flush them to zero (all paths alike; GPUs flush by default).
    torch.set_flush_denormal(True)
    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    Bsz, Dm, N, Ls, dtype = (32, 1024, 16, (2048,), torch.bfloat16) if cuda else (8, 256, 16, (256, 1024), torch.float32)
    paths = {"blelloch": selective_scan_blelloch,
             "chunked": lambda **a: kernels.selective_scan(**a, impl="chunked"),
             "triton" if cuda else "ref": lambda **a: kernels.selective_scan(**a, impl="triton" if cuda else "ref")}
    where = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    how = "median of 10 CUDA-event timings of back-to-back calls" if cuda else "median of 5 interleaved rounds"
    print(f"\nselective scan, {where}: B={Bsz} D={Dm} N={N}, {str(dtype)[6:]} inputs, {how}")
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
        if cuda:
            secs = {key: gpu_time_ms(fn) / 1e3 for key, fn in fns.items()}
        else:
            secs = timed_rounds(fns, rounds=5, steps=1)
        for name in paths:
            if (name, L) in failed:
                print(f"| {name} | {L} | failed: {failed[name, L]} | - | - |")
                continue
            res[name, L] = secs[name, "fwd"] * 1e3, secs[name, "fb"] * 1e3
            print(f"| {name} | {L} | {res[name, L][0]:.1f} | {res[name, L][1]:.1f} | "
                  f"{res.get(('blelloch', L), nan)[1] / res[name, L][1]:.2f}x |")
    if not cuda:
        for L in Ls:
            x = res.get(("blelloch", L), nan)[1] / res.get(("chunked", L), nan)[1]
            print(f"target: chunked fwd+bwd >= 2x Blelloch at L={L}: {x:.2f}x {'PASS' if x >= 2 else 'FAIL'}")
        scan_under_load(a, grad, paths, Bsz, Dm, N, Ls[-1])
        return
    L = Ls[0]
    src = torch.empty(2 ** 30, device=dev, dtype=torch.uint8)  # 1 GiB
    dst = torch.empty_like(src)
    hbm = 2 * src.numel() / (gpu_time_ms(lambda: dst.copy_(src)) / 1e3) / 1e9
    nbytes = (4 * Bsz * Dm * L + 2 * Bsz * N * L) * a["u"].element_size()  # u, delta, z read, out written; B, C read
    bw = nbytes / (res.get(("triton", L), nan)[0] / 1e3) / 1e9
    print(f"HBM copy bandwidth {hbm:.0f} GB/s; the Triton forward moves {nbytes / 1e9:.2f} GB at {bw:.0f} GB/s")
    print(f"target: Triton forward >= 50% of HBM bandwidth: {bw / hbm:.0%} {'PASS' if bw >= 0.5 * hbm else 'FAIL'}")
    x = res.get(("chunked", L), nan)[1] / res.get(("triton", L), nan)[1]
    print(f"target: Triton fwd+bwd >= 5x the chunked algorithm on this GPU: {x:.1f}x {'PASS' if x >= 5 else 'FAIL'}")


class CpuLoad:
    """Other work on the same cores, started and stopped here: a default `train.py --model=mamba`
    run on torch's default 2 threads and a niced single-threaded busy loop, the situation of a
    shared machine where a scan on 2 intra-op threads once took 38 s instead of 0.2 s."""

    def __enter__(self):
        tmp = tempfile.mkdtemp()
        env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONUNBUFFERED": "1"}
        self.procs = [subprocess.Popen([sys.executable, "train.py", "--model=mamba", "--max_iters=100000", "--eval_interval=100000",
                                        f"--out_dir={tmp}", f"--data_dir={tmp}"], cwd=os.path.dirname(os.path.abspath(__file__)),
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


@torch.no_grad()
def bench_decode(args):
    """Time per new token and cache memory against context length: Mamba's fixed-size state
    against the Transformer's KV cache, same width and depth, batch 1."""
    contexts = (64, 256, 1024, 4096)
    torch.manual_seed(0)
    shape = dict(vocab_size=512, d_model=256, n_layer=4, block_size=max(contexts) + 1)
    models = {"mamba": model_mamba.Model(model_mamba.Config(**shape)).eval(),
              "transformer": model_transformer.Model(model_transformer.Config(**shape, n_head=8, n_kv_head=2)).eval()}
    fns = {}
    for name, model in models.items():
        for ctx in contexts:
            cache = model.new_cache(1, max_len=ctx + 1)
            model(torch.randint(0, 512, (1, ctx)), cache=cache)  # prefill
            tok = torch.randint(0, 512, (1, 1))

            def step(model=model, cache=cache, tok=tok):
                model(tok, cache=cache)
                cache.len -= 1  # stay at ctx, so every call measures the same step
            fns[name, ctx] = step
    secs = timed_rounds(fns, rounds=5, steps=10)
    print(f"\nnext token after a context of n tokens, batch 1, d_model 256, 4 layers, {torch.get_num_threads()} threads"
          f"\n(Transformer: GQA 8 query / 2 K/V heads; cache = what generation holds at that context)")
    print("| context | Mamba ms/token | Mamba cache KiB | Transformer ms/token | KV cache KiB |\n|---|---|---|---|---|")
    nbytes = {(name, ctx): m.cache_bytes(m.new_cache(1, max_len=ctx)) for name, m in models.items() for ctx in contexts}
    for ctx in contexts:
        print(f"| {ctx} | {secs['mamba', ctx] * 1e3:.2f} | {nbytes['mamba', ctx] / 1024:.0f} | "
              f"{secs['transformer', ctx] * 1e3:.2f} | {nbytes['transformer', ctx] / 1024:.0f} |")
    x = secs["mamba", contexts[-1]] / secs["mamba", contexts[0]]
    print(f"target: Mamba ms/token at {contexts[-1]} within 1.3x of {contexts[0]}: {x:.2f}x {'PASS' if x <= 1.3 else 'FAIL'}")
    same = nbytes["mamba", contexts[0]] == nbytes["mamba", contexts[-1]]
    print(f"target: Mamba cache memory constant: {'PASS' if same else 'FAIL'}")


# ----------------------------------------------------------------------------- hybrid


def bench_hybrid(args):
    """Generation cache memory against context length, 8 layers of the same width: the all-attention
    Transformer, the Jamba-style hybrid (one attention layer in eight) and pure Mamba; then the
    time per new token of each at one context, side by side."""
    contexts, timed_ctx = (1024, 4096, 16384), 2048
    torch.manual_seed(0)
    shape = dict(vocab_size=512, d_model=256, block_size=max(contexts))
    attn = dict(n_head=8, n_kv_head=2)
    models = {"transformer": model_transformer.Model(model_transformer.Config(**shape, **attn, n_layer=8)).eval(),
              "hybrid": model_hybrid.Model(model_hybrid.Config(**shape, **attn, layers="Md Me Md Me Ad Me Md Me",
                                                               n_expert=16)).eval(),
              "mamba": model_mamba.Model(model_mamba.Config(**shape, n_layer=8)).eval()}
    print(f"\ngeneration cache, batch 1, float32, d_model 256, 8 layers; attention GQA 8 query / 2 K/V heads"
          f"\nhybrid: {models['hybrid'].summary()}")
    print("| context | Transformer KV MiB | hybrid KV MiB | hybrid SSM state MiB | Mamba state MiB "
          "| hybrid KV / Transformer KV | hybrid total / Transformer |\n|---|---|---|---|---|---|---|")
    mib = lambda n: f"{n / 2**20:.2f}"
    ratios = []
    for ctx in contexts:
        caches = {name: m.new_cache(1, max_len=ctx) for name, m in models.items()}
        full = models["transformer"].cache_bytes(caches["transformer"])
        h = caches["hybrid"]
        kv, total = h.k.nbytes + h.v.nbytes, models["hybrid"].cache_bytes(h)
        ratios.append(kv / full)
        print(f"| {ctx} | {mib(full)} | {mib(kv)} | {mib(total - kv)} | {mib(models['mamba'].cache_bytes(caches['mamba']))} "
              f"| 1/{full / kv:.2f} | 1/{full / total:.2f} |")
        del caches
    ok = all(abs(r - 1 / 8) < 1e-12 for r in ratios)
    print(f"target: hybrid KV cache = 1/8 of the Transformer's at every context: {'PASS' if ok else 'FAIL'}")
    fns = {}
    for name, model in models.items():
        cache = model.new_cache(1, max_len=timed_ctx + 1)
        model(torch.randint(0, 512, (1, timed_ctx)), cache=cache)  # prefill

        def step(model=model, cache=cache, tok=torch.randint(0, 512, (1, 1))):
            model(tok, cache=cache)
            cache.len -= 1  # stay at the context, so every call measures the same step
        fns[name] = step
    secs = timed_rounds(fns, rounds=5, steps=10, clock=time.process_time)
    print(f"\nnext token after {timed_ctx} tokens, batch 1, {torch.get_num_threads()} threads, CPU time of this process")
    print("| model | params (active) | CPU ms/token |\n|---|---|---|")
    for name, model in models.items():
        print(f"| {name} | {model.num_params() / 1e6:.2f}M ({model.num_params(active=True) / 1e6:.2f}M) "
              f"| {secs[name] * 1e3:.2f} |")

# ----------------------------------------------------------------------------- attention (Triton FlashAttention)

def machine():
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    return f"CPU {cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def table(header, rows):
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    for r in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(str(x).rjust(w) for x, w in zip(r, widths)))
    print()


# ----------------------------------------------------------------------------- attention
# FLOPs as the FlashAttention papers count them: two matmuls of 2*Tq*Tk*D each per head,
# halved when causal; the backward does 2.5x the forward's matmul work.

def attention_flops(B, H, T, D, causal):
    return 4 * B * H * T * T * D / (2 if causal else 1)


def cuda_peak_mib(fn):
    """Peak GPU memory allocated during fn() above what was allocated before it, in MiB."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def sdpa(backend):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def run(q, k, v, causal):
        if backend is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return run


def attention_gpu(shapes=((16, 12, 1024, 64, True), (4, 16, 4096, 128, True), (2, 16, 8192, 128, True),
                           (4, 16, 4096, 128, False)), device="cuda", impls=None):
    """shapes: (B, H, T, D, causal): the nanoGPT shape, then long sequences at D=128."""
    from torch.nn.attention import SDPBackend
    impls = impls or {
        "triton": lambda q, k, v, causal: kernels.attention(q, k, v, causal=causal, impl="triton"),
        "sdpa-flash": sdpa(SDPBackend.FLASH_ATTENTION),
        "sdpa-default": sdpa(None),
        "explicit": lambda q, k, v, causal: kernels.attention_ref(q, k, v, causal=causal),
    }
    results, rows = {}, []
    for B, H, T, D, causal in shapes:
        q, k, v, do = (torch.randn(B, H, T, D, device=device, dtype=torch.bfloat16) for _ in range(4))
        q, k, v = (x.requires_grad_() for x in (q, k, v))
        flops = attention_flops(B, H, T, D, causal)
        for name, fn in impls.items():
            try:
                with torch.no_grad():
                    fwd = gpu_time_ms(lambda: fn(q, k, v, causal))
                o = fn(q, k, v, causal)
                bwd = gpu_time_ms(lambda: torch.autograd.grad(o, (q, k, v), do, retain_graph=True))
                del o
                both = gpu_time_ms(lambda: torch.autograd.grad(fn(q, k, v, causal), (q, k, v), do))
                peak = cuda_peak_mib(lambda: torch.autograd.grad(fn(q, k, v, causal), (q, k, v), do))
            except Exception as e:  # no flash backend for this shape, a Triton compile error, out of memory ...
                rows.append([f"B{B} H{H} T{T} D{D}", "causal" if causal else "full", name, "-", "-", "-", "-",
                             "failed: " + first_line(e)])
                torch.cuda.empty_cache()
                continue
            r = dict(fwd=flops / fwd / 1e9, bwd=2.5 * flops / bwd / 1e9, both=3.5 * flops / both / 1e9, peak=peak)
            results[(B, H, T, D, causal, name)] = r
            rows.append([f"B{B} H{H} T{T} D{D}", "causal" if causal else "full", name, f"{r['fwd']:.0f}",
                         f"{r['bwd']:.0f}", f"{r['both']:.0f}", f"{peak:.0f}", ""])
        del q, k, v, do
        torch.cuda.empty_cache()
    print("attention, bf16, TFLOP/s (fwd 4*B*H*T*T*D, halved causal; bwd 2.5x) and peak extra memory of fwd+bwd")
    table(["shape", "mask", "impl", "fwd", "bwd", "fwd+bwd", "peak MiB", "note"], rows)
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
    print("targets (on an H200; dK/dV determinism is a test: see gpu_check.sh)")
    table(["target", "measured", "goal", ""], rows)


def peak_rss_mib(fn):
    """Peak resident memory of fn() above the resident memory before it, in MiB. Linux: writing 5
    to /proc/self/clear_refs resets the high-water mark VmHWM to the current RSS."""
    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) / 1024
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap pages back, so reuse of them counts too
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = status("VmRSS")
    t = time.perf_counter()
    fn()
    return status("VmHWM") - before, time.perf_counter() - t


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
    for fn in paths.values():  # warm-up: one-time allocations (thread pools, caches) are not the method's
        q, k, v = (torch.randn(1, H, lengths[0], D, requires_grad=True) for _ in range(3))
        fn(q, k, v).sum().backward()
    rows = []
    for T in lengths:
        row = [T, f"{H * T * T * 4 / 2**20:.0f}"]
        for name, fn in paths.items():
            if "interpreter" in name and T > interpreter_up_to:
                row += ["-", "-"]
                continue
            q, k, v, do = (torch.randn(1, H, T, D) for _ in range(4))
            q, k, v = (x.requires_grad_() for x in (q, k, v))
            repeats = 1 if "interpreter" in name else 2  # the lower of two: one-time allocations are noise
            step = lambda: torch.autograd.grad(fn(q, k, v), (q, k, v), do)  # noqa: E731
            mib, secs = min(peak_rss_mib(step) for _ in range(repeats))
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
    table(header, rows)


def attention():
    print(machine(), "\n")
    if torch.cuda.is_available():
        attention_gpu()
    else:
        attention_cpu_memory()


def bench_moe(args):
    """Training tokens/s of MoE models against the dense Transformer with the same active
    parameters per token (each has 384 feed-forward hidden units per token: dense 384, 8 experts
    of 192 top-2, 32 of 48 top-8, 64 of 24 top-16), each MoE with its readable loop over experts
    and with the grouped-matmul path. nanoGPT's CPU shape, float32."""
    B, T = 12, NANOGPT_SHAPE["block_size"]
    shapes = {"8 experts of 192, top-2": dict(n_expert=8, top_k=2, d_expert=192),
              "32 experts of 48, top-8 (fine-grained)": dict(n_expert=32, top_k=8, d_expert=48),
              "64 experts of 24, top-16 (fine-grained)": dict(n_expert=64, top_k=16, d_expert=24)}
    models = {"dense Transformer, d_ff 384": model_transformer.Model(model_transformer.Config(**NANOGPT_SHAPE, d_ff=384))}
    for name, kw in shapes.items():
        for path in ("loop", "grouped"):
            models[f"{name}, {path}"] = model_moe.Model(model_moe.Config(**NANOGPT_SHAPE, **kw, expert_path=path))
    secs = timed_rounds({name: train_step(m, B, T, 65) for name, m in models.items()}, rounds=5, steps=3,
                        clock=time.process_time)
    base = secs[next(iter(models))]
    print(f"\nMoE training step, batch {B} x context {T}, float32, {torch.get_num_threads()} threads, CPU time of this process")
    print("| model | params (active) | CPU ms/step | tokens per CPU-second | vs dense | grouped vs loop |\n|---|---|---|---|---|---|")
    for name, s in secs.items():
        m = models[name]
        loop = secs.get(name.replace("grouped", "loop")) if name.endswith("grouped") else None
        print(f"| {name} | {m.num_params() / 1e6:.2f}M ({m.num_params(active=True) / 1e6:.2f}M) | {s * 1e3:.1f} | "
              f"{B * T / s:,.0f} | {base / s:.2f}x | {f'{loop / s:.2f}x' if loop else ''} |")


SECTIONS = {"attention": lambda args: attention(), "train": bench_train, "generate": bench_generate, "scan": bench_scan, "decode": bench_decode, "hybrid": bench_hybrid,
            "moe": bench_moe}

if __name__ == "__main__":
    if "-h" in sys.argv or "--help" in sys.argv:
        print(__doc__.strip())
        sys.exit(0)
    names = [a for a in sys.argv[1:] if not a.startswith("--")]
    args = dict(a[2:].partition("=")[::2] for a in sys.argv[1:] if a.startswith("--"))
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        print(f"error: unknown section {unknown[0]!r}; choose from {', '.join(SECTIONS)}", file=sys.stderr)
        sys.exit(2)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name in names or SECTIONS:
        SECTIONS[name](args)
