"""
How the lab measures: the machine's name, markdown tables, timers (CPU rounds interleaved, CUDA
events), peak memory (resident on the CPU, allocated on the GPU), a training step, one decode
step against a cache, and attention's forward + backward. Shared by the benchmarks (lab.bench) and the experiments.
"""
import ctypes
import os
import platform
import statistics
import time
from pathlib import Path

import torch


def machine():
    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                if l.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").is_file() else platform.processor()
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{cpu or platform.machine()} ({os.cpu_count()} cores{gpu}), torch {torch.__version__}"


def table(header, rows):
    """Markdown table from a header list and rows of cells (anything str() can print)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def first_line(e):
    """An exception as one short line for a table cell: a Triton compile or resource error from one
    implementation must not hide the other implementations' rows."""
    msg = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {msg}"[:100]


# ----------------------------------------------------------------------------- time


def timed_rounds(fns, rounds=5, steps=10, clock=time.perf_counter, each=False):
    """Run each fn `steps` times per round, rounds interleaved so that load from other processes
    falls on all of them alike; return the median seconds per call of each (each=True: the seconds per
    call of every round, for a mean ± sd). On a shared CPU, clock=time.process_time counts only the CPU
    time this process used, which other jobs disturb far less than wall time."""
    for fn in fns.values():
        fn()  # warm up
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = clock()
            for _ in range(steps):
                fn()
            times[name].append((clock() - t0) / steps)
    return times if each else {name: statistics.median(t) for name, t in times.items()}


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


def train_step(model, batch_size, block_size, vocab_size):
    """One training step (forward, backward, AdamW) on a fixed random batch, as a function to time."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, vocab_size, (batch_size, block_size))
    y = torch.randint(0, vocab_size, (batch_size, block_size))

    def step():
        _, loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def prefill(model, idx, cache, chunk=512):
    """Feed idx (1, T) into the cache in chunks: bounded memory for the attention scores."""
    for start in range(0, idx.size(1), chunk):
        model(idx[:, start:start + chunk], cache=cache)


def decode_step(model, context, vocab_size):
    """(step, cache): step() decodes one token after `context` prefilled tokens, batch 1, and puts the
    cache back at `context`, so that every call times the same step. Random tokens: speed does not
    depend on them."""
    cache = model.new_cache(1, max_len=context + 1)
    prefill(model, torch.randint(0, vocab_size, (1, context)), cache)
    tok = torch.randint(0, vocab_size, (1, 1))

    def step():
        model(tok, cache=cache)
        cache.len -= 1  # stay at the context
    return step, cache


@torch.no_grad()
def decode_speed(model, vocab_size, context, steps):
    """Tokens/s of one-token steps at the end of a `context`-token sequence (the median step: on shared
    cores a few get descheduled), and the bytes the cache holds there. The model's block_size is the
    context (a position table or KV cache is sized by it)."""
    idx = torch.randint(vocab_size, (1, context))  # (1, context)
    cache = model.new_cache(1)
    prefill(model, idx[:, :context - steps], cache)
    times = []
    for t in range(context - steps, context):
        t0 = time.perf_counter()
        model(idx[:, t:t + 1], cache=cache)
        times.append(time.perf_counter() - t0)
    return 1 / sorted(times)[len(times) // 2], model.cache_bytes(cache)


# ----------------------------------------------------------------------------- memory


def peak_rss_mib(fn):
    """(MiB, seconds): peak resident memory of fn() above the resident memory before it, and its wall
    time. Linux: writing 5 to /proc/self/clear_refs resets the high-water mark VmHWM to the current RSS."""
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


def cuda_peak_mib(fn):
    """Peak GPU memory allocated during fn() above what was allocated before it, in MiB."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def attention_inputs(H, T, D, seed=0):
    """q, k, v (1, H, T, D) each, needing gradients, and an output gradient do, float32."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v, do = (torch.randn(1, H, T, D, generator=gen) for _ in range(4))
    return (*(x.requires_grad_() for x in (q, k, v)), do)


def attention_fwd_bwd(fn, q, k, v, do):
    """fn(q, k, v) forward and backward, as a function to time or measure."""
    return lambda: torch.autograd.grad(fn(q, k, v), (q, k, v), do)


def warm_up_attention(paths, H=2, T=64, D=16):
    """One call of each path first: one-time allocations (thread pools, caches) are not the method's."""
    for fn in paths.values():
        q, k, v = (torch.randn(1, H, T, D, requires_grad=True) for _ in range(3))
        fn(q, k, v).sum().backward()


def lowest_peak(step, repeats=2):
    """(MiB, seconds) of the run with the lowest peak: one-time allocations are noise."""
    return min(peak_rss_mib(step) for _ in range(repeats))
