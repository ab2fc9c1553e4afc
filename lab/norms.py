"""
Pre-norm against post-norm with depth, warmup and learning rate; LayerNorm against RMSNorm, in loss and
in speed.
"""
import time

import torch

from lab.charts import svg_lines
from lab.measure import table, timed_rounds
from lab.runner import SHAKESPEARE, failed, final_val, mean_spread, quick_note, seeded


def norm_speed(quick):
    """Forward + backward of the norm alone at a few (tokens, width) shapes, side by side in CPU time;
    and how far the written-out RMSNorm formula is from F.rms_norm (float32)."""
    torch.set_num_threads(1)  # one thread, like the training runs: side-by-side times on one core
    shapes = [(64, 128), (256, 512)] if quick else [(768, 128), (2048, 512), (4096, 1024)]
    rows = []
    for N, C in shapes:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(N, C, generator=gen).requires_grad_()
        w = (1 + 0.1 * torch.randn(C, generator=gen)).requires_grad_()
        g = torch.randn(N, C, generator=gen)
        paths = {"LayerNorm": lambda: torch.nn.functional.layer_norm(x, (C,), w, None, 1e-5),
                 "F.rms_norm": lambda: torch.nn.functional.rms_norm(x, (C,), w, 1e-5),
                 "x * rsqrt(mean(x^2) + eps) * w": lambda: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w}
        secs = timed_rounds({k: (lambda f=f: torch.autograd.grad(f(), (x, w), g)) for k, f in paths.items()},
                            rounds=3 if quick else 7, steps=2 if quick else 20, clock=time.process_time)
        diff = (paths["F.rms_norm"]() - paths["x * rsqrt(mean(x^2) + eps) * w"]()).abs().max().item()
        rows.append([f"{N} x {C}", *(f"{1e6 * secs[k]:.0f}" for k in paths),
                     f"{secs['LayerNorm'] / secs['F.rms_norm']:.2f}", f"{diff:.1e}"])
    return table(["tokens x width", "LayerNorm µs", "F.rms_norm µs", "written out µs", "LayerNorm / F.rms_norm time",
                  "max abs difference, F.rms_norm vs written out"], rows)


def norms(lab):
    """pre-norm vs post-norm at depth 2/6/12, with and without warmup, and over learning rates; LayerNorm vs RMSNorm"""
    depths = (2,) if lab.quick else (2, 6, 12)
    lr = "3e-3"  # 3x train.py's default, chosen before any run: high enough for warmup to matter (Xiong et al.)
    # and at the deepest, a learning-rate sweep (the grid fixed before running it): where does each placement break?
    sweep_lrs = () if lab.quick else ("1e-2", "3e-2")

    tenth = {"3e-3": "3e-4", "1e-2": "1e-3", "3e-2": "3e-3"}  # the cosine schedule ends at a tenth of the peak

    def args_at(rate):
        return SHAKESPEARE + ["--d_model=64", "--n_head=4", "--n_kv_head=4", "--norm=layernorm", f"--lr={rate}",
                              "--max_iters=600", "--eval_interval=200", f"--min_lr={tenth[rate]}"]
    base = args_at(lr)
    grid = [(f"{'pre' if pre else 'post'}-d{d}-{'warm' if warm else 'nowarm'}" + (f"-lr{rate}" if rate != lr else ""),
             d, pre, warm, rate, args_at(rate) + [f"--n_layer={d}", f"--prenorm={pre}", f"--warmup_iters={100 if warm else 0}"])
            for d in depths for rate in (lr, *(sweep_lrs if d == depths[-1] else ()))
            for pre in (True, False) for warm in (True, False) if not lab.quick or pre == warm]
    mid = depths[len(depths) // 2]
    rms_key = f"rmsnorm-d{mid}"
    configs = [(key, args) for key, *_, args in grid] + \
              [(rms_key, base + [f"--n_layer={mid}", "--prenorm=True", "--warmup_iters=100", "--norm=rmsnorm"])]
    runs = seeded(lab, configs)
    rows, panels = [], []
    for d, rate in dict.fromkeys((d, rate) for _, d, _, _, rate, _ in grid):
        series = {}
        for key, dd, pre, warm, rr, _ in grid:
            if (dd, rr) != (d, rate):
                continue
            gn = [[s["grad_norm"] for s in r.steps if "grad_norm" in s] for r in runs[key]]
            early = [max(g[:50]) if g else float("nan") for g in gn]
            rows.append([d, rate, "pre" if pre else "post", "100 steps" if warm else "none",
                         mean_spread(final_val(runs[key])) + failed(runs[key]),
                         mean_spread(early, ".2f"), mean_spread([sorted(g)[len(g) // 2] if g else float("nan") for g in gn], ".2f")])
            if gn[0]:
                w = max(1, len(gn[0]) // 60)  # a mean over windows of w steps, seed 0: readable curves
                series[f"{'pre' if pre else 'post'}-norm, {'warmup' if warm else 'no warmup'}"] = \
                    [(i + w / 2, sum(gn[0][i:i + w]) / len(gn[0][i:i + w])) for i in range(0, len(gn[0]), w)]
        panels.append(dict(title=f"{d} layers, lr {rate}", xlabel="step", ylabel="grad norm before clipping",
                           series=series, logy=True))
    ln_key = f"pre-d{mid}-warm"
    loss_rows = [["LayerNorm", mean_spread(final_val(runs[ln_key])) + failed(runs[ln_key])],
                 ["RMSNorm", mean_spread(final_val(runs[rms_key])) + failed(runs[rms_key])]]
    swept = (f"; at depth {depths[-1]} also at {' and '.join(sweep_lrs)} (a sweep added after the {lr} runs showed "
             f"no difference between the placements; its grid was fixed before running it)" if sweep_lrs else "")
    body = quick_note(lab) + f"""
Xiong et al. (2020, "On Layer Normalization in the Transformer Architecture") show that the original
post-norm Transformer (Vaswani et al. 2017) has large gradients near the output at initialisation and needs a
learning-rate warmup, more so as depth grows, while pre-norm (GPT-2) trains without one. Here: both placements
at depth {', '.join(map(str, depths))}, with a 100-step warmup and without, at one learning rate ({lr}, 3x the default,
fixed before running){swept}, gradient clipping at 1.0 as in every run of train.py (the recorded norm is the one
before clipping). Tiny Shakespeare, characters, width 64, 4 heads, context 64, batch 12, 600 steps, LayerNorm,
{len(runs[ln_key])} seed(s).

{table(["layers", "lr", "norm", "warmup", "final val loss", "largest grad norm, first 50 steps", "median grad norm"], rows)}

LayerNorm against RMSNorm (Zhang & Sennrich 2019: same quality, 7-64% faster in their RNN and Transformer
runs), pre-norm, {mid} layers, warmup, same setup:

{table(["norm", "final val loss"], loss_rows)}

Speed of the norm alone (forward + backward, float32, one thread, CPU time of this process, median of
interleaved rounds; the model's RMSNorm calls F.rms_norm):

{norm_speed(lab.quick)}

What this shows: final losses and gradient norms of each placement at this learning rate and depth, and the
measured cost of each norm on this CPU (where torch has a fused LayerNorm kernel and F.rms_norm is composed of
elementwise ops: a per-op comparison, not a claim about fused GPU kernels). What it does not show: other
widths, or depths beyond 12.

<!-- lead: interpretation -->
"""
    lab.page("Norms: pre- vs post-norm with depth and warmup; LayerNorm vs RMSNorm", body, svg_lines(panels, cols=3, width=360))
