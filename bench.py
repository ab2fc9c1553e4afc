"""
Benchmarks: speed and memory, measured side by side in one process. These are not tests: the
figures depend on the machine, so they are reported as ratios between things run together.

    python bench.py                          # every section
    python bench.py train generate           # some of them
    python bench.py train --nanogpt=PATH     # also time nanoGPT's model.py from a checkout at PATH
"""
import statistics
import sys
import time

import torch

import model_moe
import model_transformer

NANOGPT_SHAPE = dict(vocab_size=65, block_size=64, d_model=128, n_layer=4, n_head=4)  # its CPU recipe
GPT2_STYLE = dict(pos="learned", norm="layernorm", ffn="gelu", bias=False, n_kv_head=4)  # = config/gpt2_style.py


def timed_rounds(fns, rounds=5, steps=10):
    """Run each fn `steps` times per round, rounds interleaved so that load from other processes
    falls on all of them alike; return the median seconds per call of each."""
    for fn in fns.values():
        fn()  # warm up
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(steps):
                fn()
            times[name].append((time.perf_counter() - t0) / steps)
    return {name: statistics.median(t) for name, t in times.items()}


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
    secs = timed_rounds({name: train_step(m, B, T, 65) for name, m in models.items()})
    base = secs[next(iter(models))]
    print(f"\ntraining step, batch {B} x context {T}, float32, {torch.get_num_threads()} threads")
    print("| model | params | ms/step | tokens/s | relative to gpt2-style |\n|---|---|---|---|---|")
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

    secs = timed_rounds({"cached": cached, "recompute": lambda: model(idx)}, rounds=5, steps=5)
    print(f"\nnext token at context {ctx} (modern default, {model.num_params() / 1e6:.2f}M params, batch 1)")
    print("| method | ms/token | speed-up |\n|---|---|---|")
    print(f"| recompute the context | {secs['recompute'] * 1e3:.2f} | 1.0x |")
    print(f"| KV cache | {secs['cached'] * 1e3:.2f} | {secs['recompute'] / secs['cached']:.1f}x |")
    print(f"KV cache: {model.cache_bytes(cache) / 2**20:.2f} MiB for {ctx + 1} positions "
          f"({model.config.n_kv_head} of {model.config.n_head} heads stored)")


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
    secs = timed_rounds({name: train_step(m, B, T, 65) for name, m in models.items()}, rounds=5, steps=3)
    base = secs[next(iter(models))]
    print(f"\nMoE training step, batch {B} x context {T}, float32, {torch.get_num_threads()} threads")
    print("| model | params (active) | ms/step | tokens/s | vs dense | grouped vs loop |\n|---|---|---|---|---|---|")
    for name, s in secs.items():
        m = models[name]
        loop = secs.get(name.replace("grouped", "loop")) if name.endswith("grouped") else None
        print(f"| {name} | {m.num_params() / 1e6:.2f}M ({m.num_params(active=True) / 1e6:.2f}M) | {s * 1e3:.1f} | "
              f"{B * T / s:,.0f} | {base / s:.2f}x | {f'{loop / s:.2f}x' if loop else ''} |")


SECTIONS = {"train": bench_train, "generate": bench_generate, "moe": bench_moe}

if __name__ == "__main__":
    names = [a for a in sys.argv[1:] if not a.startswith("--")]
    args = dict(a[2:].partition("=")[::2] for a in sys.argv[1:] if a.startswith("--"))
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        print(f"error: unknown section {unknown[0]!r}; choose from {', '.join(SECTIONS)}", file=sys.stderr)
        sys.exit(2)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name in names or SECTIONS:
        SECTIONS[name](args)
