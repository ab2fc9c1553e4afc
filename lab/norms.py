"""
Pre-norm against post-norm with depth, warmup, learning rate and gradient clipping; LayerNorm against RMSNorm,
in loss and in speed.
"""
import math
import time

import torch

from lab.charts import svg_lines
from lab.measure import table, timed_rounds
from lab.runner import SHAKESPEARE, data_of, fixed_val_losses, quick_note, seeded
from lab.verdicts import claim, fmt, mean_sd, unexplained

PATHS = ("LayerNorm", "F.rms_norm", "x * rsqrt(mean(x^2) + eps) * w")


def norm_speed(quick):
    """Forward + backward of the norm alone at a few (tokens, width) shapes, side by side in CPU time, rounds
    interleaved: ({shape: {path: [µs per call, one per round]}}, the table); and how far the written-out RMSNorm
    formula is from F.rms_norm (float32)."""
    torch.set_num_threads(1)  # one thread, like the training runs: side-by-side times on one core
    shapes = [(64, 128), (256, 512)] if quick else [(768, 128), (2048, 512), (4096, 1024)]
    rounds, steps = (3, 2) if quick else (7, 20)
    rows, times = [], {}
    for N, C in shapes:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(N, C, generator=gen).requires_grad_()
        w = (1 + 0.1 * torch.randn(C, generator=gen)).requires_grad_()
        g = torch.randn(N, C, generator=gen)
        paths = {"LayerNorm": lambda: torch.nn.functional.layer_norm(x, (C,), w, None, 1e-5),
                 "F.rms_norm": lambda: torch.nn.functional.rms_norm(x, (C,), w, 1e-5),
                 "x * rsqrt(mean(x^2) + eps) * w": lambda: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w}
        fns = {k: (lambda f=f: torch.autograd.grad(f(), (x, w), g)) for k, f in paths.items()}
        secs = timed_rounds(fns, rounds, steps, time.process_time, each=True)  # interleaved rounds, CPU time
        t = times[N, C] = {k: [1e6 * v for v in secs[k]] for k in fns}
        diff = (paths["F.rms_norm"]() - paths["x * rsqrt(mean(x^2) + eps) * w"]()).abs().max().item()
        ratio = mean_sd(t["LayerNorm"])[0] / mean_sd(t["F.rms_norm"])[0]
        rows.append([f"{N} x {C}", *(fmt(t[k], ".0f") for k in PATHS), f"{ratio:.2f}", f"{diff:.1e}"])
    return times, table(["tokens x width", "LayerNorm µs", "F.rms_norm µs", "written out µs", "LayerNorm / F.rms_norm time",
                         "max abs difference, F.rms_norm vs written out"], rows), rounds


def unigram_loss(dataset, data_dir):
    """Cross-entropy on the validation split of predicting every token by its frequency in the training split:
    the loss of a model that has learned nothing about context."""
    d = data_of(dataset, data_dir)
    counts = torch.bincount(d.train, minlength=d.vocab_size).double() + 1  # +1: a token unseen in training
    logp = (counts / counts.sum()).log()
    return -logp[d.val].mean().item()


def diverged(run):
    """True when train.py stopped the run because its loss was not finite."""
    log = run.dir / "log.txt"
    return not run.ok and log.is_file() and "loss is" in log.read_text()


def ended(runs):
    """' (run i diverged: loss not finite)' etc. for the runs that did not finish; '' when all did."""
    bad = [f"run {i + 1} " + ("diverged: loss not finite" if diverged(r) else f"FAILED: exit {r.rc}")
           for i, r in enumerate(runs) if not r.ok]
    return f" ({'; '.join(bad)})" if bad else ""


# the claims whose disagreement `disagreement` discusses
EXPLAINED = ("pre-norm reaches a lower val loss than post-norm", "warmup lowers", "clipping at 1.0 lowers", "F.rms_norm is faster")


def disagreement(claims):
    """What the page says about the claim lines whose verdict is 'disagrees', by which claims they are."""
    against = [c for c in claims if c.endswith("**disagrees**")]
    said = []
    if any("pre-norm reaches a lower val loss than post-norm" in c for c in against):
        said.append("Where pre-norm reaching the lower loss reads disagrees, post-norm ends lower. Why is untested here; "
                    "Liu et al. (2020, \"Understanding the Difficulty of Training Transformers\") report that post-norm, "
                    "where it trains at all, often ends below pre-norm, whose later layers matter less to the output.")
    if any("warmup lowers" in c for c in against):
        said.append("Where warmup lowering the loss reads disagrees, the runs without warmup end lower; why is untested "
                    "here (with clipping on, see above, the two are confounded).")
    if any("clipping at 1.0 lowers" in c for c in against):
        said.append("Where clipping lowering the loss reads disagrees, the runs without clipping end lower; why is "
                    "untested here.")
    if any("F.rms_norm is faster" in c for c in against):
        said.append("Where the speed claim reads disagrees, the paragraph under the speed table compares F.rms_norm with "
                    "the written-out formula on this CPU; whether fused kernels (GPU, `--compile`) reverse it is untested "
                    "here.")
    return "\n" + " ".join(said) + "\n" if said else ""


def norms(lab):
    """pre-norm vs post-norm at depth 2/6/12, with and without warmup, over learning rates and without clipping; LayerNorm vs RMSNorm"""
    depths = (2,) if lab.quick else (2, 6, 12)
    deep = depths[-1]
    lr = "3e-3"  # 3x train.py's default, chosen before any run: high enough for warmup to matter (Xiong et al.)
    high = "1e-2"  # at the deepest, a higher rate (fixed before running it): where does each placement break?
    tenth = {"3e-3": "3e-4", "1e-2": "1e-3"}  # the cosine schedule ends at a tenth of the peak
    iters, warm_steps = 600, 100

    def args_at(rate):  # train.py evaluates only at the start and the end: the page scores fixed batches
        return SHAKESPEARE + ["--d_model=64", "--n_head=4", "--n_kv_head=4", "--norm=layernorm", f"--lr={rate}",
                              f"--max_iters={iters}", f"--eval_interval={iters}", "--eval_iters=2", f"--min_lr={tenth[rate]}"]
    # (key, layers, pre-norm, warmup, lr, clip): every placement with and without warmup at lr, at the deepest also
    # at the higher rate, and there post-norm again without gradient clipping (clipping is a warmup of its own)
    cells = [(d, pre, warm, rate, True) for d in depths for rate in (lr, *((high,) if d == deep and not lab.quick else ()))
             for pre in (True, False) for warm in (True, False) if not lab.quick or pre == warm]
    cells += [(deep if not lab.quick else 2, False, warm, high if not lab.quick else lr, False)
              for warm in ((True, False) if not lab.quick else (False,))]
    key = lambda d, pre, warm, rate, clip: (f"{'pre' if pre else 'post'}-d{d}-{'warm' if warm else 'nowarm'}"
                                           + (f"-lr{rate}" if rate != lr else "") + ("" if clip else "-noclip"))
    grid = [(key(*c), *c, args_at(c[3]) + [f"--n_layer={c[0]}", f"--prenorm={c[1]}",
                                           f"--warmup_iters={warm_steps if c[2] else 0}", *([] if c[4] else ["--grad_clip=0"])])
            for c in cells]
    mid = depths[len(depths) // 2]
    rms_key, ln_key = f"rmsnorm-d{mid}", key(mid, True, True, lr, True)
    configs = [(k, args) for k, *_, args in grid] + \
              [(rms_key, args_at(lr) + [f"--n_layer={mid}", "--prenorm=True", f"--warmup_iters={warm_steps}", "--norm=rmsnorm"])]
    runs = seeded(lab, configs)
    loss, scored_on = fixed_val_losses(lab, runs)
    corpus = "pydoc" if lab.quick else "shakespeare_char"
    unigram = unigram_loss(corpus, lab.data_dir)
    gn = {k: [[s["grad_norm"] for s in r.steps if "grad_norm" in s] for r in rs] for k, rs in runs.items()}
    stat = lambda k, f: [f(g) if g else float("nan") for g in gn[k]]
    early = lambda g: max(g[1:warm_steps + 1] or [float("nan")])  # after the first update: step 0's norm is the init's alone
    clipped = lambda g: sum(v > 1.0 for v in g)
    median = lambda g: sorted(g)[len(g) // 2]

    rows, panels, collapsed, names = [], [], [], {}
    for d, rate, clip in dict.fromkeys((d, rate, clip) for _, d, _, _, rate, clip, _ in grid):
        series = {}
        for k, dd, pre, warm, rr, cc, _ in grid:
            if (dd, rr, cc) != (d, rate, clip):
                continue
            name = f"{'pre' if pre else 'post'}-norm, {'warmup' if warm else 'no warmup'}" + ("" if clip else ", no clipping")
            rows.append([d, rate, "pre" if pre else "post", f"{warm_steps} steps" if warm else "none", "1.0" if clip else "off",
                         fmt(loss[k]) + ended(runs[k]), fmt(stat(k, early), ".2f"), fmt(stat(k, clipped), ".0f"),
                         fmt(stat(k, median), ".2f")])
            names[k] = f"{d} layers, lr {rate}, {name}"
            if abs(mean_sd(loss[k])[0] - unigram) < 0.05:
                collapsed.append(names[k])
            g = gn[k][0]
            if g:
                w = max(1, len(g) // 60)  # a mean over windows of w steps, the first seed: readable curves
                series[name] = [(i + w / 2, sum(g[i:i + w]) / len(g[i:i + w])) for i in range(0, len(g), w)
                                if all(map(math.isfinite, g[i:i + w]))]
        panels.append(dict(title=f"{d} layers, lr {rate}" + ("" if clip else ", no clipping"), xlabel="step",
                           ylabel="grad norm before clipping", series=series, logy=True, marks=[(warm_steps, "warmup ends")]))
    stopped = {k: n for k in names if (n := sum(map(diverged, runs[k])))}
    step0 = {}  # the gradient at step 0 depends on the initialisation and the first batch alone: one per depth and placement
    for k, d, pre, *_ in grid:
        step0.setdefault((d, pre), [g[0] for g in gn[k] if g])
    over = [f"{d} layers {'pre' if pre else 'post'}-norm" for (d, pre), v in step0.items() if mean_sd(v)[0] > 1.0]
    first100 = {k: stat(k, lambda g: sum(v > 1.0 for v in g[:warm_steps])) for k, *_ in grid}
    busiest = max((k for k, *_, clip, _ in grid if clip), key=lambda k: mean_sd(first100[k])[0])
    speed, speed_table, rounds = norm_speed(lab.quick)
    big = max(speed)
    ratio = {s: mean_sd(t["LayerNorm"])[0] / mean_sd(t["F.rms_norm"])[0] for s, t in speed.items()}
    written = {s: mean_sd(t["x * rsqrt(mean(x^2) + eps) * w"])[0] / mean_sd(t["F.rms_norm"])[0] for s, t in speed.items()}

    like = 0.67 < written[big] < 1.5  # F.rms_norm within 1.5x of the formula written out in elementwise operations
    speed_note = (f"At {big[0]} x {big[1]}, LayerNorm takes {ratio[big]:.2f}x the time of F.rms_norm, and the formula "
                  f"written out in elementwise operations {written[big]:.2f}x that of F.rms_norm (their outputs differ by the last column). "
                  + ("F.rms_norm costs about what the written-out formula costs, as separate elementwise operations "
                     "would, while torch's CPU LayerNorm is one fused kernel. " if like else "")
                  + "On GPUs and in compiled graphs (`--compile`) both can be fused; this is a per-operation comparison "
                    "on this CPU, not a claim about fused kernels.")
    setting = f"Transformer, {'the built-in corpus' if lab.quick else 'tiny Shakespeare characters'}, width 64, {iters} steps"
    K = lambda d, pre, warm, rate=lr, clip=True: key(d, pre, warm, rate, clip)

    def claim_of_losses(text, a_name, a, b_name, b, expect):
        """A loss claim; one whose two sides both sit at the frequency baseline says so: neither side trained."""
        if all(abs(mean_sd(v)[0] - unigram) < 0.05 for v in (a, b)):
            text += f" (both sides at the frequency baseline of {unigram:.3f}, neither trains)"
        return claim(text, a_name, a, b_name, b, expect)

    claims = [claim_of_losses(f"{setting}, {d} layers, lr {lr}, {warm_steps}-step warmup: pre-norm reaches a lower val loss than "
                    f"post-norm (Xiong et al. 2020)", "pre-norm", loss[K(d, True, True)], "post-norm", loss[K(d, False, True)], "<")
              for d in depths if not lab.quick]
    if not lab.quick:
        claims += [
            claim_of_losses(f"{setting}, {deep} layers, lr {lr}: warmup lowers post-norm's val loss (Xiong et al. 2020)",
                  "warmup", loss[K(deep, False, True)], "none", loss[K(deep, False, False)], "<"),
            claim_of_losses(f"{setting}, {deep} layers, lr {high}: warmup lowers post-norm's val loss (Xiong et al. 2020)",
                  "warmup", loss[K(deep, False, True, high)], "none", loss[K(deep, False, False, high)], "<"),
            claim_of_losses(f"{setting}, {deep} layers, lr {high}, no gradient clipping: warmup lowers post-norm's val loss "
                  f"(Xiong et al. 2020)", "warmup", loss[K(deep, False, True, high, False)], "none",
                  loss[K(deep, False, False, high, False)], "<"),
            claim_of_losses(f"{setting}, {deep} layers, lr {high}, no warmup: gradient clipping at 1.0 lowers post-norm's val loss",
                  "clipping", loss[K(deep, False, False, high)], "none", loss[K(deep, False, False, high, False)], "<"),
            claim_of_losses(f"{setting}, {deep} layers, lr {high}, no warmup: pre-norm reaches a lower val loss than post-norm "
                  f"(Xiong et al. 2020)", "pre-norm", loss[K(deep, True, False, high)], "post-norm",
                  loss[K(deep, False, False, high)], "<"),
            claim_of_losses(f"{setting}, {deep} layers, lr {high}: warmup lowers pre-norm's val loss (Xiong et al. 2020 report "
                  f"pre-norm training well without one)", "warmup", loss[K(deep, True, True, high)], "none",
                  loss[K(deep, True, False, high)], "<")]
    claims += [claim_of_losses(f"{setting}, pre-norm, {mid} layers, warmup: RMSNorm in place of LayerNorm costs loss (Zhang & "
                     f"Sennrich 2019 report the same quality)", "RMSNorm", loss[rms_key], "LayerNorm", loss[ln_key], ">"),
               claim(f"Norm alone, forward + backward, float32, one CPU thread, {big[0]} x {big[1]}: F.rms_norm is faster "
                     f"than LayerNorm (Zhang & Sennrich 2019: 7-64% faster), µs per call over rounds", "F.rms_norm",
                     speed[big]["F.rms_norm"], "LayerNorm", speed[big]["LayerNorm"], "<", ".0f")]
    swept = (f"; at depth {deep} also at {high} (a rate added after runs at {lr} showed no difference between the "
             f"placements), and there post-norm again without gradient clipping" if not lab.quick else "")
    body = quick_note(lab) + f"""
Xiong et al. (2020, "On Layer Normalization in the Transformer Architecture") show that the original
post-norm Transformer (Vaswani et al. 2017) has large gradients near the output at initialisation and needs a
learning-rate warmup, more so as depth grows, while pre-norm (GPT-2) trains without one. Here: both placements
at depth {', '.join(map(str, depths))}, with a {warm_steps}-step warmup and without, at one learning rate ({lr}, 3x the
default, fixed before running){swept}; gradient clipping at 1.0 as in every run of
train.py unless the row says off (the recorded norm is the one before clipping). Tiny Shakespeare, characters,
width 64, 4 heads, context 64, batch 12, {iters} steps, LayerNorm, {len(runs[ln_key])} seed(s). Val loss: {scored_on};
mean ± sd (n seeds). Grad norms: the largest over steps 1-{warm_steps} (step 0 is the initialisation's alone, the
same at every rate and warmup), the number of the {iters} steps whose norm exceeded 1.0 (clipped, where clipping is
on), and the median; each mean ± sd over seeds. The picture: each row's gradient norm over training, its first seed,
in means over windows of about a sixtieth of the run, log scale; the dashed line marks where the warmup ends.

{table(["layers", "lr", "norm", "warmup", "clip", "final val loss", f"largest grad norm, steps 1-{warm_steps}",
        f"steps with norm > 1.0, of {iters}", "median grad norm"], rows)}

Predicting every character by its frequency in the training text gives a val loss of {unigram:.3f}: a model at
that loss has learned nothing about context. Rows within 0.05 of it: {'; '.join(collapsed) if collapsed else 'none'}.
Runs that stopped with a loss that is not finite (their loss is left out of the mean, n says how many are in):
{'; '.join(f"{names[k]}, {n} of {len(runs[k])}" for k, n in stopped.items()) if stopped else 'none'}.

Clipping and warmup: the gradient norm at step 0, before any update, is {'; '.join(f"{fmt(v, '.2f')} at {d} layers {'pre' if pre else 'post'}-norm" for (d, pre), v in step0.items())}.
{f"Where its mean is above 1.0 ({', '.join(over)}), clipping at 1.0 acts from the very first step." if over else "No mean is above 1.0, so clipping does not act at the very first step."}
The most clipped row in the first {warm_steps} steps ({names[busiest]}) was clipped in {fmt(first100[busiest], '.0f')} of them.
AdamW divides each update by a running root mean square of past gradients, so scaling every gradient alike would
change nothing (but for its epsilon); clipping scales only the steps above 1.0, which changes how much those steps weigh against their
neighbours in the optimizer's moment estimates, most of all early in training, where warmup acts too. With clipping
on, every warmup result is measured together with it. The rows with clipping off test this for post-norm at {deep} layers and lr {high if not lab.quick else lr};
pre-norm's warmup result at {high if not lab.quick else lr} is measured with clipping only (untested without).

LayerNorm against RMSNorm (Zhang & Sennrich 2019: same quality, 7-64% faster in their RNN and Transformer
runs), pre-norm, {mid} layers, warmup, same setup:

{table(["norm", "final val loss"], [["LayerNorm", fmt(loss[ln_key]) + ended(runs[ln_key])],
                                     ["RMSNorm", fmt(loss[rms_key]) + ended(runs[rms_key])]])}

Speed of the norm alone (forward + backward, float32, one thread, CPU time of this process, {rounds} interleaved
rounds, µs per call as mean ± sd over rounds; the model's RMSNorm calls F.rms_norm):

{speed_table}

{speed_note}

Checked against the tables (a difference counts when it exceeds 2 standard errors; a claim that a change costs
loss reads **no measurable difference** where a paper's "the same quality" holds at this budget):

{chr(10).join(claims)}
{disagreement(claims)}
{unexplained(claims, EXPLAINED)}
What this shows: final losses and gradient norms of each placement at these learning rates and depths, with and
without clipping where the warmup result depends on it, and the measured cost of each norm on this CPU. What it does
not show: other widths, depths beyond {deep}, or longer training.
"""
    lab.page("Norms: pre- vs post-norm with depth and warmup; LayerNorm vs RMSNorm", body, svg_lines(panels, cols=3, width=360))
