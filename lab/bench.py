"""
Benchmarks: speed and memory, measured side by side in one process. These are not tests: the
figures depend on the machine, so they are reported as ratios between things run together.

    python -m lab.bench                          # every section
    python -m lab.bench train generate           # some of them
    python -m lab.bench train --nanogpt=PATH     # also time nanoGPT's model.py from a checkout at PATH
    python -m lab.bench scan decode              # selective scan paths; Mamba state vs KV cache
    python -m lab.bench attention                # FlashAttention: GPU TFLOP/s; CPU memory against length
    python -m lab.bench hybrid                   # cache memory: Transformer vs Jamba-style hybrid vs Mamba
    python -m lab.bench moe                      # grouped experts vs the loop vs a dense feed-forward
    python -m lab.bench reference                # GPT-2 124M decoding: KV cache vs transformers' generate
    python -m lab.bench sweep [--budget=S]       # GPU: the kernels under other launch settings (KERNEL_CONFIG)
    python -m lab.bench gpu_compile [--python=P] # every kernel variant compiled for sm_90 and sm_80, with this
                                                 # Triton and each other interpreter's: results/gpu_compile.md
    python -m lab.bench mamba                    # Mamba vs Transformer CPU training; the scan vs memory bandwidth

On a CUDA machine `scan` uses GPU sizes and the Triton kernel. gpu_compile (minutes per Triton
version) runs only when named.
Sections with a target print PASS/FAIL lines.
"""
import os
import sys
import time

import torch

if not torch.cuda.is_available():  # run the Triton kernels on the CPU too (set before kernels is imported)
    os.environ.setdefault("TRITON_INTERPRET", "1")
import model_hybrid  # noqa: E402
import model_mamba  # noqa: E402
import model_moe  # noqa: E402
import model_transformer  # noqa: E402
from lab.bench_attention import attention  # noqa: E402
from lab.bench_mamba import bench_mamba  # noqa: E402
from lab.bench_reference import bench_reference  # noqa: E402
from lab.bench_scan import bench_scan  # noqa: E402
from lab.bench_sweep import bench_sweep  # noqa: E402
from lab.measure import decode_step, timed_rounds, train_step  # noqa: E402

NANOGPT_SHAPE = dict(vocab_size=65, block_size=64, d_model=128, n_layer=4, n_head=4)  # its CPU recipe
GPT2_STYLE = dict(pos="learned", norm="layernorm", ffn="gelu", bias=False, n_kv_head=4)  # = config/gpt2_style.py


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
    cached, cache = decode_step(model, ctx, 65)
    idx = torch.randint(0, 65, (1, ctx))
    secs = timed_rounds({"cached": cached, "recompute": lambda: model(idx)}, rounds=5, steps=5, clock=time.process_time)
    print(f"\nnext token at context {ctx} (modern default, {model.num_params() / 1e6:.2f}M params, batch 1)")
    print("| method | CPU ms/token | speed-up |\n|---|---|---|")
    print(f"| recompute the context | {secs['recompute'] * 1e3:.2f} | 1.0x |")
    print(f"| KV cache | {secs['cached'] * 1e3:.2f} | {secs['recompute'] / secs['cached']:.1f}x |")
    print(f"KV cache: {model.cache_bytes(cache) / 2**20:.2f} MiB for {ctx + 1} positions "
          f"({model.config.n_kv_head} of {model.config.n_head} heads stored)")


@torch.no_grad()
def bench_decode(args):
    """Time per new token and cache memory against context length: Mamba's fixed-size state
    against the Transformer's KV cache, same width and depth, batch 1."""
    contexts = (64, 256, 1024, 4096)
    torch.manual_seed(0)
    shape = dict(vocab_size=512, d_model=256, n_layer=4, block_size=max(contexts) + 1)
    models = {"mamba": model_mamba.Model(model_mamba.Config(**shape)).eval(),
              "transformer": model_transformer.Model(model_transformer.Config(**shape, n_head=8, n_kv_head=2)).eval()}
    fns = {(name, ctx): decode_step(model, ctx, 512)[0] for name, model in models.items() for ctx in contexts}
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
    fns = {name: decode_step(model, timed_ctx, 512)[0] for name, model in models.items()}
    secs = timed_rounds(fns, rounds=5, steps=10, clock=time.process_time)
    print(f"\nnext token after {timed_ctx} tokens, batch 1, {torch.get_num_threads()} threads, CPU time of this process")
    print("| model | params (active) | CPU ms/token |\n|---|---|---|")
    for name, model in models.items():
        print(f"| {name} | {model.num_params() / 1e6:.2f}M ({model.num_params(active=True) / 1e6:.2f}M) "
              f"| {secs[name] * 1e3:.2f} |")


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


def bench_gpu_compile(args):
    """results/gpu_compile.md, whole: this interpreter's Triton and each --python=PATH[,PATH]'s."""
    from lab import gpu_compile_page
    others = [p for p in (args.get("python") or "").split(",") if p]
    missing = [p for p in others if not (os.path.isfile(p) and os.access(p, os.X_OK))]
    if missing:
        print(f"error: --python={missing[0]} is not an executable file (an interpreter of an environment with "
              "torch and triton)", file=sys.stderr)
        sys.exit(2)
    gpu_compile_page.write_page(others, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                     "results", "gpu_compile.md"))


SECTIONS = {"attention": attention, "train": bench_train, "generate": bench_generate, "scan": bench_scan,
            "decode": bench_decode, "hybrid": bench_hybrid, "moe": bench_moe, "reference": bench_reference,
            "sweep": bench_sweep, "gpu_compile": bench_gpu_compile, "mamba": bench_mamba}
ONLY_WHEN_NAMED = {"gpu_compile"}

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
    for name in names or [n for n in SECTIONS if n not in ONLY_WHEN_NAMED]:
        SECTIONS[name](args)
