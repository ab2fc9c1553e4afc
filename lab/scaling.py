"""
A Chinchilla iso-FLOP mini-sweep: loss against size at three budgets, the optimum of each, N_opt against C.
"""
import math

import numpy as np

from lab.charts import svg_lines
from lab.measure import table
from lab.runner import config_args, model_module, params_of, vocab_of


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


def scaling(lab):
    """a Chinchilla iso-FLOP mini-sweep: U-curves of loss against size at three budgets, N_opt against C"""
    sizes = [(16, 2), (24, 2), (32, 3), (48, 3), (64, 4), (96, 4)]  # (d_model, n_layer): 7K to 0.4M parameters
    budgets = [2e11, 6e11, 1.8e12]  # training FLOPs; at ~20 tokens per parameter their optima are ~40K to ~120K
    run = dict(dataset="shakespeare_char", block_size=64, batch_size=32, eval_iters=20, lr=2e-3, min_lr=2e-4)
    if lab.quick:
        sizes, budgets = sizes[:3], [2e8, 6e8]
        run.update(block_size=32, batch_size=8, eval_iters=1)
    vocab = vocab_of(run["dataset"], lab.data_dir)
    tok_per_iter = run["batch_size"] * run["block_size"]
    info = {s: params_of("transformer", dict(d_model=s[0], n_layer=s[1], n_head=4), vocab, run["block_size"])
            for s in sizes}  # (params, active, training FLOPs per token)
    plan = {}
    for c in budgets:
        for s in sizes:
            iters = max(2, round(c / (info[s][2] * tok_per_iter)))  # the budget: FLOPs per token x tokens
            plan[f"C{c:.0e}-d{s[0]}x{s[1]}"] = (c, s, iters)
    results = lab.train([(name, ["--model=transformer", f"--d_model={s[0]}", f"--n_layer={s[1]}", "--n_head=4",
                                 *config_args(run), f"--max_iters={it}", f"--eval_interval={it}",
                                 f"--log_interval={it}", f"--warmup_iters={max(1, min(100, it // 10))}"])
                         for name, (c, s, it) in plan.items()])
    rows, curves, optima, fits = [], {}, [], []
    for c in budgets:
        pts = [(info[s][0], results[name].final.get("val_loss", float("nan")), it)
               for name, (cc, s, it) in plan.items() if cc == c]
        curves[f"C = {c:.0e}"] = [(n, loss) for n, loss, _ in pts]
        good = [(n, loss) for n, loss, _ in pts if loss == loss]
        a, b, c0 = fit_parabola([math.log10(n) for n, _ in good], [l for _, l in good]) if len(good) >= 3 else (0, 0, 0)
        inside = a > 0 and min(n for n, _ in good) <= 10 ** (-b / (2 * a)) <= max(n for n, _ in good)
        if inside:  # Chinchilla's approach 2: a parabola in log N through each iso-FLOP curve, its vertex
            n_opt, how = 10 ** (-b / (2 * a)), "parabola"
            l_opt = c0 - b * b / (4 * a)  # the loss at the vertex
        else:  # no minimum among the sizes: the grid does not bracket this budget's optimum
            n_opt, l_opt = min(good, key=lambda p: p[1]) if good else (float("nan"), float("nan"))
            how = "best point (no minimum)" if a <= 0 else "best point (vertex outside the sizes)"
        logs = np.log([info[s][0] for s in sizes]), np.log([info[s][2] for s in sizes])
        f_opt = math.exp(np.interp(math.log(n_opt), *logs)) if n_opt == n_opt else float("nan")
        d_opt = c / f_opt  # tokens at the optimum: the budget over the interpolated FLOPs per token
        optima.append((c, n_opt, d_opt, l_opt))
        fits.append([f"{c:.0e}", how, f"{n_opt:,.0f}", f"{d_opt:,.0f}", f"{d_opt / n_opt:.1f}"])
        for n, loss, it in pts:
            rows.append([f"{c:.0e}", f"{n:,}", it, f"{it * tok_per_iter / n:.1f}", f"{loss:.4f}"])
    ok = [(c, n, d) for c, n, d, _ in optima if n == n and n > 0]
    if len(ok) >= 2:
        a_n, _ = fit_power_law([c for c, _, _ in ok], [n for _, n, _ in ok])
        a_d, _ = fit_power_law([c for c, _, _ in ok], [d for _, _, d in ok])
        law = f"N_opt ∝ C^{a_n:.2f} and D_opt ∝ C^{a_d:.2f} (least squares on logs over {len(ok)} budgets)"
        a_k, kaplan = kaplan_refit(optima, sizes, info, vocab, run["block_size"])
        law += (f". Counted Kaplan et al.'s way (2020: N without the embedding and the head, C = 6 N D without the "
                f"attention-score FLOPs; the same runs and optima): N_opt ∝ C^{a_k:.2f}, at "
                + ", ".join(f"C = {c:.2g}, N = {n:,.0f}" for c, n in kaplan)
                + f"; the counting moves the exponent by {a_k - a_n:+.2f} (Kaplan et al. report 0.73; Pearce & Song "
                f"(2024) trace much of its difference from Hoffmann et al.'s 0.50 to this counting at small scale)")
    else:
        law = "too few optima for a power law"
    body = (f"Transformers of {len(sizes)} sizes (d_model x n_layer: {', '.join(f'{d}x{n}' for d, n in sizes)}), "
            f"character-level tiny Shakespeare, {tok_per_iter} tokens per step, lr {run['lr']} with warmup and a "
            f"cosine decay that ends at each run's last step. A budget C in training FLOPs sets each run's steps: "
            f"max_iters = C / (model.flops_per_token() x tokens per step) (6 FLOPs per matrix weight and the "
            f"attention scores, PaLM's convention). N counts every parameter, the embedding and the output layer "
            f"included (2 x 65 x d_model). Loss: validation, at the end.\n\n"
            + table(["C (FLOPs)", "N (params)", "steps", "tokens / N", "val loss"], rows)
            + f"\n\nThe optimum per budget (a parabola in log10 N through the {len(sizes)} losses; its vertex):\n\n"
            + table(["C (FLOPs)", "from", "N_opt", "D_opt (tokens)", "D_opt / N_opt"], fits)
            + f"\n\nFit: {law}. Hoffmann et al. (2022) find N_opt ∝ C^0.50 and about 20 tokens per parameter at "
              f"10^18 to 10^24 FLOPs. This fit stands on {len(budgets)} budgets of {len(sizes)} points each, at "
              f"{budgets[0]:.0e} to {budgets[-1]:.0e} FLOPs with models of thousands of parameters, on a 1M-character corpus that the small models "
              f"see many times over (repeated data is worth less than new data), with one learning rate for all "
              f"sizes; at this scale the embedding and the attention-score FLOPs are a large share of N and C, "
              f"so how N is counted moves the optimum. Read it as the method at work, not as a measurement of "
              f"the exponent.")
    marks = {f"optimum C = {c:.0e}": [(n, l)] for c, n, _, l in optima if n == n}
    picture = svg_lines([dict(title="iso-FLOP curves", xlabel="parameters N", ylabel="validation loss",
                              series={**curves, **marks}, logx=True)], cols=1, width=560, height=320)
    lab.page("Chinchilla iso-FLOP mini-sweep", body, picture)
