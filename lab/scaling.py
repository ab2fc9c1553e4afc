"""
A Chinchilla iso-FLOP mini-sweep: loss against size at three budgets, the optimum of each, N_opt against C.
"""
import math

import numpy as np

from lab.charts import svg_lines
from lab.measure import table
from lab.runner import config_args, data_of, model_module, params_of, quick_note, vocab_of
from lab.verdicts import claim, fixed_batches, fmt, score_run


def fit_parabola(xs, ys):
    """Least-squares y = a x^2 + b x + c -> (a, b, c)."""
    return tuple(float(v) for v in np.polyfit(xs, ys, 2))


def fit_power_law(xs, ys):
    """Least squares on logs: y = k x^a -> (a, k)."""
    a, logk = np.polyfit(np.log(xs), np.log(ys), 1)
    return float(a), float(math.exp(logk))


def non_embedding_params(d_model, n_layer, vocab, block_size):
    """Kaplan et al.'s (2020) N: the parameters without the vocabulary and position matrices (embedding, head)."""
    module = model_module("transformer")
    m = module.Model(module.Config(d_model=d_model, n_layer=n_layer, n_head=4, vocab_size=vocab, block_size=block_size))
    return sum(p.numel() for name, p in m.named_parameters() if not name.startswith(("wte.", "wpe.", "lm_head.")))


def kaplan_refit(optima, sizes, info, vocab, block_size):
    """The same optima counted Kaplan's way: N without embeddings (interpolated in log N between the grid's sizes)
    and C = 6 N D, no attention FLOPs. -> (exponent of N_opt in C, [(C, N)]) or (nan, [...]) with < 2 optima."""
    logs = np.log([info[s][0] for s in sizes]), np.log([non_embedding_params(*s, vocab, block_size) for s in sizes])
    points = [(6 * n_k * d, n_k) for _, n, d, _ in optima if n == n and n > 0
              for n_k in [math.exp(np.interp(math.log(n), *logs))]]
    return (fit_power_law(*zip(*points))[0] if len(points) >= 2 else float("nan")), points


def optimum(points, c, sizes, info):
    """One iso-FLOP curve [(N, loss)] at budget c -> (vertex N or nan, vertex loss, best measured N, its loss).
    Chinchilla's approach 2: a parabola in log N through the curve; its vertex counts only where it is a minimum
    inside the grid's sizes."""
    good = [(n, loss) for n, loss in points if loss == loss]
    best = min(good, key=lambda p: p[1]) if good else (float("nan"), float("nan"))
    a, b, c0 = fit_parabola([math.log10(n) for n, _ in good], [l for _, l in good]) if len(good) >= 3 else (0, 0, 0)
    if a > 0 and min(n for n, _ in good) <= 10 ** (-b / (2 * a)) <= max(n for n, _ in good):
        return 10 ** (-b / (2 * a)), c0 - b * b / (4 * a), *best
    return float("nan"), float("nan"), *best


def tokens_at(n, c, sizes, info):
    """D = C / (FLOPs per token at N), the FLOPs per token interpolated in log N between the grid's sizes."""
    logs = np.log([info[s][0] for s in sizes]), np.log([info[s][2] for s in sizes])
    return c / math.exp(np.interp(math.log(n), *logs)) if n == n else float("nan")


def exponent_of(points):
    """a of y ∝ x^a over [(x, y)] with finite y; nan with fewer than 2."""
    points = [(x, y) for x, y in points if y == y and y > 0]
    return fit_power_law(*zip(*points))[0] if len(points) >= 2 else float("nan")


def scaling(lab):
    """a Chinchilla iso-FLOP mini-sweep: U-curves of loss against size at three budgets, N_opt against C"""
    sizes = [(16, 2), (24, 2), (32, 3), (48, 3), (64, 4), (96, 4)]  # (d_model, n_layer): 8K to 0.46M parameters
    budgets = [1e11, 3e11, 9e11]  # training FLOPs; three seeds of the grid fit about 20 minutes on 2 cores
    run = dict(dataset="shakespeare_char", block_size=64, batch_size=32, lr=2e-3, min_lr=2e-4, eval_iters=1)
    n_val = 16  # fixed validation batches, the same for every size, budget and seed
    if lab.quick:
        sizes, budgets, n_val = sizes[:3], [2e8, 6e8], 2
        run.update(block_size=32, batch_size=8)
    seeds = lab.seed_values(1 if lab.quick else None)
    vocab = vocab_of(run["dataset"], lab.data_dir)
    tok_per_iter = run["batch_size"] * run["block_size"]
    info = {s: params_of("transformer", dict(d_model=s[0], n_layer=s[1], n_head=4), vocab, run["block_size"])
            for s in sizes}  # (params, active, training FLOPs per token)
    plan = {}
    for c in budgets:
        for s in sizes:
            iters = max(2, round(c / (info[s][2] * tok_per_iter)))  # the budget: FLOPs per token x tokens
            for seed in seeds:
                plan[f"C{c:.2g}-d{s[0]}x{s[1]}-s{seed}"] = (c, s, iters, seed)
    results = lab.train([(name, ["--model=transformer", f"--d_model={s[0]}", f"--n_layer={s[1]}", "--n_head=4",
                                 *config_args(run), f"--max_iters={it}", f"--eval_interval={it}", f"--seed={seed}",
                                 f"--log_interval={it}", f"--warmup_iters={max(1, min(100, it // 10))}"])
                         for name, (c, s, it, seed) in plan.items()])
    batches = fixed_batches(data_of(run["dataset"], lab.data_dir), n_val, run["batch_size"], run["block_size"])
    loss = {key: score_run(results[name], batches)[0] for name, key in plan.items()}  # key: (c, s, iters, seed)
    opt = {(c, seed): optimum([(info[s][0], loss[c, s, it, sd]) for cc, s, it, sd in loss if cc == c and sd == seed],
                              c, sizes, info) for c in budgets for seed in seeds}
    # N_opt per budget: the vertex where the parabola has one inside the grid, else the best measured point
    n_opt = {k: (v[0] if v[0] == v[0] else v[2]) for k, v in opt.items()}
    law = {"vertex (else best point)": n_opt, "best measured point": {k: v[2] for k, v in opt.items()}}
    a_n = {how: [exponent_of([(c, ns[c, seed]) for c in budgets]) for seed in seeds] for how, ns in law.items()}
    a_d = [exponent_of([(c, tokens_at(n_opt[c, seed], c, sizes, info)) for c in budgets]) for seed in seeds]
    a_k = [kaplan_refit([(c, n_opt[c, seed], tokens_at(n_opt[c, seed], c, sizes, info), 0) for c in budgets], sizes, info, vocab, run["block_size"])[0]
           for seed in seeds]
    rows = [[f"{c:.2g}", f"{info[s][0]:,}", it, f"{it * tok_per_iter / info[s][0]:.1f}",
             fmt([loss[c, s, it, sd] for sd in seeds], ".4f")]
            for c in budgets for s in sizes for it in {k[2] for k in loss if k[:2] == (c, s)}]
    fits = [[f"{c:.2g}", f"{sum(opt[c, sd][0] == opt[c, sd][0] for sd in seeds)} of {len(seeds)}",
             fmt([opt[c, sd][0] for sd in seeds], ",.0f"), fmt([opt[c, sd][2] for sd in seeds], ",.0f"),
             fmt([tokens_at(n_opt[c, sd], c, sizes, info) / n_opt[c, sd] for sd in seeds], ".1f")] for c in budgets]
    exps = [["N_opt, every parameter counted, vertex (else best point)", fmt(a_n["vertex (else best point)"], ".2f")],
            ["N_opt, every parameter counted, best measured point", fmt(a_n["best measured point"], ".2f")],
            ["N_opt, Kaplan's counting (no embedding, head or attention FLOPs), vertex (else best point)", fmt(a_k, ".2f")],
            ["D_opt, every parameter counted, vertex (else best point)", fmt(a_d, ".2f")]]
    where = (f"Chinchilla iso-FLOP sweep, Transformers of {info[sizes[0]][0]:,} to {info[sizes[-1]][0]:,} parameters "
             f"on tiny Shakespeare characters")
    body = (quick_note(lab) + f"Transformers of {len(sizes)} sizes (d_model x n_layer: {', '.join(f'{d}x{n}' for d, n in sizes)}), "
            f"character-level tiny Shakespeare, {tok_per_iter} tokens per step, lr {run['lr']} with warmup and a "
            f"cosine decay that ends at each run's last step, {len(seeds)} seed(s) per point. A budget C in training "
            f"FLOPs sets each run's steps: max_iters = C / (model.flops_per_token() x tokens per step) (6 FLOPs per "
            f"matrix weight and the attention scores, PaLM's convention). N counts every parameter, the embedding and "
            f"the output layer included (2 x 65 x d_model). Loss: each run's last checkpoint on the same {n_val} fixed "
            f"validation batches; mean ± sd over seeds (n).\n\n"
            + table(["C (FLOPs)", "N (params)", "steps", "tokens / N", "val loss"], rows)
            + f"\n\nThe optimum per budget and seed: the vertex of a parabola in log10 N through the {len(sizes)} "
              f"losses (Chinchilla's approach 2), where it is a minimum inside the sizes, and the best measured point "
              f"beside it (the two can differ by a grid step: the curves are flat near the bottom):\n\n"
            + table(["C (FLOPs)", "seeds with a vertex inside", "N_opt, vertex", "N_opt, best point",
                     "D_opt / N_opt (tokens per parameter)"], fits)
            + "\n\nThe exponents, fitted per seed over the budgets (least squares on logs), mean ± sd over seeds:\n\n"
            + table(["exponent of C", "value"], exps)
            + f"\n\nHoffmann et al. (2022) find N_opt ∝ C^0.50 and about 20 tokens per parameter at 10^18 to "
              f"10^24 FLOPs; Kaplan et al. (2020), counting N without embeddings and C without attention, found "
              f"N_opt ∝ C^0.73, and Pearce & Song (2024) trace much of that difference to the counting at small scale. "
              f"Checked on the same runs (a difference counts when it exceeds 2 standard errors over seeds):\n\n"
            + claim(f"{where}: counting N and C Kaplan's way gives a larger N_opt exponent than counting every "
                    f"parameter (Pearce & Song 2024)", "Kaplan's counting", a_k, "every parameter",
                    a_n["vertex (else best point)"], ">", ".2f")
            + f"\n\nThis fit stands on {len(budgets)} budgets of {len(sizes)} points each, at {budgets[0]:.2g} to "
              f"{budgets[-1]:.2g} FLOPs with models of thousands of parameters, on a 1M-character corpus that the "
              f"small models see many times over (repeated data is worth less than new data), with one learning rate "
              f"for all sizes; at this scale the embedding and the attention-score FLOPs are a large share of N and "
              f"C. Read the exponents as the method at work, not as a measurement of the exponent at scale.")
    curves = {f"C = {c:.2g}": [(info[s][0], sum(loss[c, s, it, sd] for sd in seeds) / len(seeds))
                                for s in sizes for it in {k[2] for k in loss if k[:2] == (c, s)}] for c in budgets}
    marks = {}
    for c in budgets:  # the vertex of the seeds' mean curve, as a point of its own
        vn, vl, _, _ = optimum(curves[f"C = {c:.2g}"], c, sizes, info)
        if vn == vn:
            marks[f"vertex, C = {c:.2g}"] = [(vn, vl)]
    picture = svg_lines([dict(title="iso-FLOP curves (mean over seeds)", xlabel="parameters N",
                              ylabel="validation loss", series={**curves, **marks}, logx=True)], cols=1, width=560, height=320)
    lab.page("Chinchilla iso-FLOP mini-sweep", body, picture)
