"""
MHA, GQA and MQA: KV cache, decode time and loss; FlashAttention's memory against T, D and H.
"""
import time

import torch

import kernels
import model_transformer
from lab.charts import svg_lines
from lab.measure import attention_fwd_bwd, attention_inputs, decode_step, lowest_peak, table, timed_rounds, \
    warm_up_attention
from lab.runner import SHAKESPEARE, failed, final_val, kv_bytes_per_token, mean_spread, model_of, quick_note, seeded


@torch.no_grad()
def decode_ms(kv_heads, contexts, quick):
    """Next-token time against a KV cache of each context, batch 1, 8 query heads of 32, 4 layers,
    side by side in CPU time; random weights (time does not depend on them)."""
    torch.set_num_threads(1)  # one thread, like the training runs: side-by-side times on one core
    fns = {}
    for K in kv_heads:
        torch.manual_seed(0)
        m = model_transformer.Model(model_transformer.Config(vocab_size=65, d_model=256, n_layer=4, n_head=8, n_kv_head=K,
                                                             block_size=max(contexts) + 1)).eval()
        for ctx in contexts:
            fns[K, ctx], _ = decode_step(m, ctx, 65)
    secs = timed_rounds(fns, rounds=2 if quick else 5, steps=2 if quick else 10, clock=time.process_time)
    return {k: 1000 * s for k, s in secs.items()}


def attention_memory(quick):
    """Peak extra resident memory and time of causal attention fwd+bwd (B=1, fp32): the explicit formula
    (kernels.attention_ref) against the tiled path (kernels.attention on the CPU: torch's SDPA flash
    kernel), sweeping T, then the head dim D, then the number of heads H. Uses lab.measure.peak_rss_mib."""
    torch.set_num_threads(1)  # one thread, like the training runs: side-by-side times on one core
    paths = {"explicit": lambda q, k, v: kernels.attention_ref(q, k, v, causal=True),
             "tiled": lambda q, k, v: kernels.attention(q, k, v, causal=True, impl="torch")}
    if quick:
        sweeps = [("T", [(4, 128, 32), (4, 256, 32)]), ("D", [(4, 256, 16), (4, 256, 64)]), ("H", [(1, 256, 32), (4, 256, 32)])]
    else:
        sweeps = [("T", [(4, T, 64) for T in (512, 1024, 2048)]), ("D", [(4, 1024, D) for D in (16, 64, 256)]),
                  ("H", [(H, 1024, 64) for H in (1, 4, 16)])]
    warm_up_attention(paths)
    rows, curves = [], {}  # curves: {sweep: {path: [(x, MiB)]}}
    for what, shapes in sweeps:
        for H, T, D in shapes:
            q, k, v, do = attention_inputs(H, T, D)
            step = {name: attention_fwd_bwd(fn, q, k, v, do) for name, fn in paths.items()}
            mib = {name: lowest_peak(s)[0] for name, s in step.items()}
            secs = timed_rounds(step, rounds=2 if quick else 3, steps=1, clock=time.process_time)
            with torch.no_grad():
                diff = (paths["explicit"](q, k, v) - paths["tiled"](q, k, v)).abs().max().item()
            rows.append([what, H, T, D, f"{H * T * T * 4 / 2**20:.1f}", f"{mib['explicit']:.0f}", f"{mib['tiled']:.0f}",
                         f"{1e3 * secs['explicit']:.0f}", f"{1e3 * secs['tiled']:.0f}", f"{diff:.1e}"])
            for name in paths:
                curves.setdefault(what, {}).setdefault(f"{name} (peak MiB)", []).append((dict(T=T, D=D, H=H)[what], mib[name]))
    panels = [dict(title=f"attention fwd+bwd: peak memory against {what}", xlabel=what, ylabel="MiB", logx=True,
                   logy=True, series=series) for what, series in curves.items()]
    return panels, table(["sweep", "H", "T", "D", "one (H,T,T) fp32 matrix MiB", "explicit peak MiB", "tiled peak MiB",
                  "explicit CPU ms", "tiled CPU ms", "max abs difference of outputs"], rows)


def kind(n_head, n_kv_head):
    return "MHA" if n_kv_head == n_head else "MQA" if n_kv_head == 1 else "GQA"


def attention(lab):
    """MHA / GQA / MQA: KV cache, decode speed, loss; FlashAttention memory against T, D, H; speed, exactness"""
    heads = [(4, "MHA 4:4"), (2, "GQA 4:2"), (1, "MQA 4:1")]
    train_args = SHAKESPEARE + ["--max_iters=1000", "--eval_interval=250"]
    runs = seeded(lab, [(f"kv{K}", train_args + [f"--n_kv_head={K}"]) for K, _ in heads])
    contexts = (256, 1024) if lab.quick else (256, 1024, 4096)
    ms = decode_ms([K * 2 for K, _ in heads], contexts, lab.quick)  # 8 query heads: 8, 4, 2 K/V heads
    rows = []
    for K, label in heads:
        m = model_of(train_args + [f"--n_kv_head={K}"], lab.quick)
        rows.append([label + failed(runs[f"kv{K}"]), mean_spread(final_val(runs[f"kv{K}"])), f"{m.num_params():,}",
                     f"{kv_bytes_per_token(m):,}"])
    decode_rows = [[f"8:{2 * K} ({kind(8, 2 * K)})", *(f"{ms[2 * K, c]:.2f}" for c in contexts)] for K, label in heads]
    mem_panels, mem = attention_memory(lab.quick)
    body = quick_note(lab) + f"""
Multi-query attention (Shazeer 2019) and grouped-query attention (Ainslie et al. 2023) let groups of query
heads share one key/value head: the KV cache shrinks by n_head / n_kv_head and decoding, which reads the whole
cache for every new token, gets faster; Ainslie et al. report GQA close to MHA in quality and MQA a little
worse. FlashAttention (Dao et al. 2022) computes the same attention tile by tile without storing the T x T
matrix of scores, so its memory grows linearly in T; the explicit formula stores (H, T, T) scores and
probabilities, which grow with heads x T², not with the head dim (the course text's O(n²·d) is wrong on this).

Trained at the default modern recipe on tiny Shakespeare (characters, config/shakespeare_char.py), equal query
heads (4), {runs['kv4'][0].final.get('iter', '?')} iterations, {len(runs['kv4'])} seed(s); KV cache in float32 bytes per
token of context (all layers):

{table(["attention", "val loss", "parameters", "KV cache bytes/token"], rows)}

Decode: time for the next token against a KV cache of the given context, batch 1, d_model 256, 4 layers,
8 query heads, random weights, all variants side by side in this process (CPU time, median of interleaved
rounds):

{table(["query : K/V heads", *[f"ms/token at {c}" for c in contexts]], decode_rows)}

Attention alone, causal, forward + backward, B = 1, float32: peak resident memory above the memory before the
call (Linux VmHWM; lab.measure.peak_rss_mib, lower of two runs), CPU time (median of interleaved rounds), and the
largest difference between the two outputs. One sweep at a time: T, then D, then H.

{mem}

What this shows: the KV cache and decode cost of each variant (bytes are arithmetic, times are measured side by
side), their loss at one small budget, and on this CPU how attention memory and time scale with T, D and H for
the explicit formula and the tiled kernel. What it does not show: GPU kernels (see python -m lab.bench attention), or
quality at scale, where the head count matters more.

<!-- lead: interpretation -->
"""
    panels = [dict(title="decode: next token after a context", xlabel="context (tokens)", ylabel="CPU ms/token",
                   series={f"8:{2 * K} K/V heads": [(c, ms[2 * K, c]) for c in contexts] for K, _ in heads}, logx=True)]
    lab.page("Attention: MHA, GQA, MQA and FlashAttention", body, svg_lines(panels + mem_panels, cols=2))
