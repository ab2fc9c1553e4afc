"""
Linear against quadratic: training tokens/s and peak memory against context length for the Transformer
(tiled and explicit attention), Mamba and the hybrid, on the CPU, with fitted exponents and where the
curves cross. Decoding cost per token is bench.md's (python -m lab.bench decode).
"""
import math
import time

import torch

from lab.charts import svg_lines
from lab.measure import peak_rss_mib, table, train_step
from lab.runner import model_module
from lab.scaling import fit_power_law
from lab.verdicts import claim, fmt

MODELS = {  # label: (model file, fields)
    "Transformer, tiled attention": ("transformer", dict(flash=True)),
    "Transformer, explicit attention": ("transformer", dict(flash=False)),
    "Mamba": ("mamba", {}),
    "hybrid Md Ad": ("hybrid", dict(layers="Md Ad")),
}
TILED, EXPLICIT, MAMBA, HYBRID = MODELS


def fits(label, fields, T, budget_gib):
    """Explicit attention holds the (H, T, T) scores, probabilities and their gradients of every layer: skip
    lengths where that alone would pass the budget."""
    if label != EXPLICIT:
        return True
    return 4 * fields["n_head"] * T * T * 4 * fields["n_layer"] <= budget_gib * 2 ** 30


def context_cost(lab):
    """training tokens/s and peak memory against context 256..8192: Transformer (tiled, explicit), Mamba, hybrid"""
    lengths, rounds, budget_gib, vocab = (256, 512, 1024, 2048, 4096, 8192), 3, 6, 256
    shape = dict(d_model=128, n_layer=2, n_head=4, n_kv_head=4)
    if lab.quick:
        lengths, rounds, shape = (32, 64, 128), 2, dict(d_model=32, n_layer=1, n_head=2, n_kv_head=2)
    torch.set_num_threads(1)  # one core, as the training runs: times side by side in this process
    models, steps = {}, {}
    for label, (name, fields) in MODELS.items():
        module = model_module(name)
        known = {k: v for k, v in {**shape, **fields}.items() if k in module.Config.__dataclass_fields__}
        for T in lengths:
            if fits(label, {**shape, **fields}, T, budget_gib):
                torch.manual_seed(0)
                m = module.Model(module.Config(vocab_size=vocab, block_size=T, **known))
                models[label, T] = m
                steps[label, T] = train_step(m, 1, T, vocab)
    secs = {key: [] for key in steps}  # seconds per step, one per round; rounds interleaved over every model and length
    for fn in steps.values():
        fn()  # warm up
    for _ in range(rounds):
        for key, fn in steps.items():
            t0 = time.process_time()
            fn()
            secs[key].append(time.process_time() - t0)
    peaks = {key: [peak_rss_mib(fn)[0] for _ in range(2)] for key, fn in steps.items()}  # two measurements each
    peak = {key: min(v) for key, v in peaks.items()}  # the lower: one-time allocations are noise
    tok_s = {key: [key[1] / s for s in v] for key, v in secs.items()}
    half = lengths[len(lengths) // 2 - 1:]  # the upper lengths: the leading term shows there

    def exponent(label, values):  # per round: a spread for the verdict
        pts = [(T, values[label, T]) for T in half if (label, T) in values]
        return [fit_power_law([T for T, _ in pts], [v[i] for _, v in pts])[0] for i in range(rounds)] if len(pts) > 1 else []
    slope = {label: exponent(label, secs) for label in MODELS}
    mem_slope = {label: [fit_power_law(*zip(*[(T, max(peaks[label, T][i], 1e-3)) for T in half if (label, T) in peaks]))[0]
                         for i in range(2)] if sum((label, T) in peaks for T in half) > 1 else [] for label in MODELS}
    rows = [[label, *(fmt(tok_s[label, T], ".0f") if (label, T) in tok_s else "does not fit" for T in lengths),
             fmt(slope[label], ".2f"), fmt(mem_slope[label], ".2f")] for label in MODELS]
    mem_rows = [[label, *(f"{peak[label, T]:.0f}" if (label, T) in peak else "-" for T in lengths)] for label in MODELS]

    def crossing(a, b):  # the first length where a's tokens/s falls below b's, interpolated in log T
        prev = None
        for T in lengths:
            if (a, T) not in tok_s or (b, T) not in tok_s:
                continue
            d = math.log(sum(tok_s[a, T]) / sum(tok_s[b, T]))
            if prev and prev[1] > 0 >= d:
                f = prev[1] / (prev[1] - d)
                return f"near {math.exp(math.log(prev[0]) + f * math.log(T / prev[0])):.0f} tokens"
            if prev is None and d <= 0:
                return f"at or before {T} tokens (the shortest measured)"
            prev = (T, d)
        return "not within the measured lengths"
    params = {label: models[label, lengths[0]].num_params() for label in MODELS if (label, lengths[0]) in models}
    body = (f"One training step (forward, backward, AdamW) of batch 1 at each context length, float32, one thread, CPU "
            f"time of this process, {rounds} rounds interleaved over every model and length (tokens/s: mean ± sd over "
            f"rounds); peak memory: the lower of 2 measurements of the resident memory a step adds (its exponent is fitted to "
            f"each measurement, mean ± sd over the 2). Models at "
            f"d_model {shape['d_model']}, {shape['n_layer']} layers ({', '.join(f'{k} {v:,} params' for k, v in params.items())}); "
            f"explicit attention is skipped where its score matrices alone would pass {budget_gib} GiB. The exponent "
            f"is the slope of log(seconds per step) against log(length) over {half[0]}..{half[-1]}: 1 is linear, 2 "
            f"quadratic.\n\n"
            + table(["model", *(f"tok/s @{T}" for T in lengths), "time exponent", "memory exponent"], rows)
            + "\n\nPeak memory (MiB):\n\n" + table(["model", *(f"@{T}" for T in lengths)], mem_rows)
            + f"\n\nWhere the curves cross: the tiled Transformer falls below Mamba's tokens/s "
            f"{crossing(TILED, MAMBA)}; explicit attention below Mamba {crossing(EXPLICIT, MAMBA)}; the tiled "
            f"Transformer below the hybrid {crossing(TILED, HYBRID)}. Decoding one token against a cache: "
            f"[bench.md](bench.md).\n\nThe claim (attention costs O(T^2) in time per sequence, a selective scan O(T); "
            f"Gu & Dao 2023, section 3.3), checked against the exponents above (a difference counts when it exceeds 2 "
            f"standard errors over rounds):\n\n"
            + "\n".join([claim("training cost: the Transformer's time per sequence grows faster with context length than Mamba's (larger exponent)", "tiled attention", slope[TILED],
                               "Mamba", slope[MAMBA], ">", ".2f"),
                         claim("training memory: explicit attention's peak grows faster with context length than the "
                               "tiled kernel's (FlashAttention's claim: linear, not quadratic, memory)", "explicit",
                               mem_slope[EXPLICIT], "tiled", mem_slope[TILED], ">", ".2f")])
            + "\n\nAt these sizes the feed-forward and projections (linear in T) dominate the attention term at short "
            "lengths, so the exponent approaches 2 only where the T^2 term takes over.")
    series = lambda values: {label: [(T, sum(values[label, T]) / len(values[label, T]) if isinstance(values[label, T], list)
                                      else values[label, T]) for T in lengths if (label, T) in values] for label in MODELS}
    panels = [dict(title="training tokens/s", xlabel="context length", ylabel="tokens/s", logx=True, logy=True,
                   series=series(tok_s)),
              dict(title="peak memory of a step", xlabel="context length", ylabel="MiB", logx=True, logy=True,
                   series=series({k: max(v, 1e-3) for k, v in peak.items()}))]
    lab.page("Training cost against context length", body, svg_lines(panels, cols=2, width=420))
