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
from lab.runner import SHAKESPEARE, failed, fixed_val_losses, kv_bytes_per_token, model_of, quick_note, seeded
from lab.verdicts import claim, fmt, mean_sd, unexplained


@torch.no_grad()
def decode_ms(kv_heads, contexts, quick):
    """Next-token time against a KV cache of each context, batch 1, 8 query heads of 32, 4 layers, side by side
    in CPU time, rounds interleaved; random weights (time does not depend on them). {(K, context): [ms per
    token, one per round]}."""
    torch.set_num_threads(1)  # one thread, like the training runs: side-by-side times on one core
    fns = {}
    for K in kv_heads:
        torch.manual_seed(0)
        m = model_transformer.Model(model_transformer.Config(vocab_size=65, d_model=256, n_layer=4, n_head=8, n_kv_head=K,
                                                             block_size=max(contexts) + 1)).eval()
        for ctx in contexts:
            fns[K, ctx], _ = decode_step(m, ctx, 65)
    rounds, steps = (2, 2) if quick else (5, 10)
    secs = timed_rounds(fns, rounds, steps, time.process_time, each=True)  # interleaved rounds, CPU time
    return {k: [1000 * t for t in v] for k, v in secs.items()}, rounds


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
    rows, curves, measured = [], {}, []  # curves: {sweep: {path: [(x, MiB)]}}; measured: the same as numbers
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
            measured.append(dict(sweep=what, H=H, T=T, D=D, explicit=max(mib["explicit"], 1.0), tiled=max(mib["tiled"], 1.0),
                                 diff=diff, **{f"{p} ms": 1e3 * secs[p] for p in paths}))
            for name in paths:
                curves.setdefault(what, {}).setdefault(f"{name} (peak MiB)", []).append((dict(T=T, D=D, H=H)[what], mib[name]))
    panels = [dict(title=f"attention fwd+bwd: peak memory against {what}", xlabel=what, ylabel="MiB", logx=True,
                   logy=True, series=series) for what, series in curves.items()]
    return panels, table(["sweep", "H", "T", "D", "one (H,T,T) fp32 matrix MiB", "explicit peak MiB", "tiled peak MiB",
                  "explicit CPU ms", "tiled CPU ms", "max abs difference of outputs"], rows), measured


def kind(n_head, n_kv_head):
    return "MHA" if n_kv_head == n_head else "MQA" if n_kv_head == 1 else "GQA"


def growth(rows, what):
    """{path: peak at the sweep's largest value / at its smallest}, and that value's ratio, for one sweep."""
    sweep = [r for r in rows if r["sweep"] == what]
    lo, hi = sweep[0], sweep[-1]
    return {p: hi[p] / lo[p] for p in ("explicit", "tiled")}, hi[what] / lo[what], lo[what], hi[what]


def attention(lab):
    """MHA / GQA / MQA: KV cache, decode speed, loss; FlashAttention memory against T, D, H; speed, exactness"""
    heads = [(4, "MHA 4:4"), (2, "GQA 4:2"), (1, "MQA 4:1")]
    iters = 1000  # train.py evaluates only at the start and the end: the page scores fixed batches
    train_args = SHAKESPEARE + [f"--max_iters={iters}", f"--eval_interval={iters}", "--eval_iters=2"]
    runs = seeded(lab, [(f"kv{K}", train_args + [f"--n_kv_head={K}"]) for K, _ in heads])
    loss, scored_on = fixed_val_losses(lab, runs)
    contexts = (256, 1024) if lab.quick else (256, 1024, 4096)
    decode_kv = (8, 4, 2, 1)  # with 8 query heads: MHA, GQA 2:1 and 4:1 per group, MQA
    ms, rounds = decode_ms(decode_kv, contexts, lab.quick)
    rows = []
    for K, label in heads:
        m = model_of(train_args + [f"--n_kv_head={K}"], lab.quick)
        rows.append([label + failed(runs[f"kv{K}"]), fmt(loss[f"kv{K}"]), f"{m.num_params():,}", f"{kv_bytes_per_token(m):,}"])
    name = {K: f"8:{K} ({kind(8, K)})" for K in decode_kv}
    decode_rows = [[name[K], *(fmt(ms[K, c], ".2f") for c in contexts)] for K in decode_kv]
    mem_panels, mem, measured = attention_memory(lab.quick)
    cfg = model_of(train_args, lab.quick).config
    corpus = "the built-in corpus" if lab.quick else "tiny Shakespeare characters"
    setting = f"Transformer, {corpus}, {cfg.n_layer} layers x width {cfg.d_model}, {cfg.n_head} query heads, {runs['kv4'][0].final.get('iter', '?')} iterations"
    top = max(contexts)
    decode_setting = f"Transformer decode, batch 1, width 256, 4 layers, 8 query heads, context {top}, one CPU thread"
    lines = [claim(f"{setting}: GQA 4:2 in place of MHA costs loss (Ainslie et al. 2023 report GQA close to MHA)",
                   "GQA (2 K/V heads)", loss["kv2"], "MHA (4 K/V heads)", loss["kv4"], ">"),
             claim(f"{setting}: MQA 4:1 in place of MHA costs loss (Shazeer 2019; Ainslie et al. 2023 report a small cost)",
                   "MQA (1 K/V head)", loss["kv1"], "MHA (4 K/V heads)", loss["kv4"], ">"),
             claim(f"{decode_setting}: MQA (8:1) takes less time per token than MHA (8:8), ms over rounds (Shazeer 2019)",
                   "MQA, 1 K/V head", ms[1, top], "MHA, 8 K/V heads", ms[8, top], "<", ".2f"),
             claim(f"{decode_setting}: GQA 8:2 takes less time per token than MHA (8:8), ms over rounds (Ainslie et al. 2023)",
                   "GQA, 2 K/V heads", ms[2, top], "MHA, 8 K/V heads", ms[8, top], "<", ".2f")]
    speedup = {K: {c: mean_sd(ms[8, c])[0] / mean_sd(ms[K, c])[0] for c in contexts} for K in decode_kv}
    below = (" The gain stays below the cache's factor of 8: only the cache read shrinks with the K/V heads, while the "
             "projections and the feed-forward cost every variant alike." if speedup[1][top] < 8 else "")
    t_g, t_x, t_lo, t_hi = growth(measured, "T")
    d_g, d_x, d_lo, d_hi = growth(measured, "D")
    h_g, h_x, h_lo, h_hi = growth(measured, "H")
    faster = [r["explicit ms"] / r["tiled ms"] for r in measured]
    body = quick_note(lab) + f"""
Multi-query attention (Shazeer 2019) and grouped-query attention (Ainslie et al. 2023) let groups of query
heads share one key/value head: the KV cache shrinks by n_head / n_kv_head and decoding, which reads the whole
cache for every new token, gets faster; Ainslie et al. report GQA close to MHA in quality and MQA a little
worse. FlashAttention (Dao et al. 2022) computes the same attention tile by tile without storing the T x T
matrix of scores, so its memory grows linearly in T; the explicit formula stores (H, T, T) scores and
probabilities, which grow with heads x T², not with the head dim (the course text's O(n²·d) counts the head dim
in the wrong term).

Trained at the default modern recipe on tiny Shakespeare (characters, config/shakespeare_char.py), equal query
heads ({cfg.n_head}), {runs['kv4'][0].final.get('iter', '?')} iterations, {len(runs['kv4'])} seed(s); val loss: {scored_on};
mean ± sd (n seeds). KV cache in float32 bytes per token of context (all layers):

{table(["attention", "val loss", "parameters", "KV cache bytes/token"], rows)}

Decode: time for the next token against a KV cache of the given context, batch 1, d_model 256, 4 layers,
8 query heads (so 8:2 is GQA with 4 query heads per K/V head, and 8:1 is MQA), random weights, all variants side
by side in this process, CPU time, mean ± sd over {rounds} interleaved rounds:

{table(["query : K/V heads", *[f"ms/token at {c}" for c in contexts]], decode_rows)}

At context {top}, MHA's next token takes {speedup[4][top]:.2f}x the time of 8:4, {speedup[2][top]:.2f}x that of 8:2 and
{speedup[1][top]:.2f}x that of MQA, whose cache is an eighth of MHA's; at context {min(contexts)}, {speedup[1][min(contexts)]:.2f}x
that of MQA.{below}

Attention alone, causal, forward + backward, B = 1, float32: peak resident memory above the memory before the
call (Linux VmHWM; lab.measure.peak_rss_mib, lower of two runs), CPU time (median of interleaved rounds), and the
largest difference between the two outputs. One sweep at a time: T, then D, then H.

{mem}

From T = {t_lo} to {t_hi} ({t_x:.0f}x; one (H, T, T) matrix {t_x ** 2:.0f}x) the explicit formula's peak grows
{t_g['explicit']:.1f}x and the tiled kernel's {t_g['tiled']:.1f}x; from D = {d_lo} to {d_hi} ({d_x:.0f}x) {d_g['explicit']:.1f}x and
{d_g['tiled']:.1f}x; from H = {h_lo} to {h_hi} ({h_x:.0f}x) {h_g['explicit']:.1f}x and {h_g['tiled']:.1f}x. The tiled kernel
(torch's CPU flash kernel behind `kernels.attention`) takes {min(faster):.1f}-{max(faster):.1f}x less CPU time than the
explicit formula at these shapes, and the outputs differ by at most {max(r['diff'] for r in measured):.1e}. Each
peak is one measurement (the lower of two) on a machine that may be shared: read the growth, not the exact MiB.

Checked against the tables (a difference counts when it exceeds 2 standard errors; a claim that a change costs
loss reads **no measurable difference** where a paper's "close to" holds at this budget):

{chr(10).join(lines)}

{unexplained(lines)}

What this shows: the KV cache and decode cost of each variant (bytes are arithmetic, times are measured side by
side), their loss at one small budget, and on this CPU how attention memory and time scale with T, D and H for
the explicit formula and the tiled kernel. What it does not show: GPU kernels (see python -m lab.bench attention), or
quality at scale, where the head count matters more.
"""
    panels = [dict(title="decode: next token after a context", xlabel="context (tokens)", ylabel="CPU ms/token",
                   series={f"{name[K]} decode": [(c, mean_sd(ms[K, c])[0]) for c in contexts] for K in decode_kv}, logx=True)]
    lab.page("Attention: MHA, GQA, MQA and FlashAttention", body, svg_lines(panels + mem_panels, cols=2))
