"""
Recall. recall: selective copying and multi-key induction (also at 4x the training length) for the
Transformer, MoE, Mamba and a hybrid at matched parameters. mqar: MQAR against the number of key-value
pairs at matched parameters, with Jamba's and Zamba's hybrids. mqar_state: Mamba's state size against the
number of pairs, in the form of Zoology's figure (Arora et al. 2023), attention as the reference.
induction_heads: the Mamba paper's induction heads (Gu & Dao 2023, section 4.1.2), trained at 256 tokens
and tested at longer ones, against the paper's training budget.

Every run trains until it is solved (val_acc >= 0.99) or flat (no rise for a few evaluations), max_iters
being the cap, and is scored on the same fixed validation batches as every other model and seed.
"""
import math

import cli
import data
from lab.charts import svg_bars, svg_lines
from lab.measure import table
from lab.runner import config_args, data_of, kv_bytes_per_token, matched_archs, params_of, quick_note
from lab.verdicts import claim, fixed_batches, fmt, mean_sd, no_recall, score, score_run, unexplained

RECALL_ARCHS = {  # label: (model file, hybrid layer pattern); the first sets the parameter target
    "transformer": ("transformer", None),
    "moe": ("moe", None),
    "mamba": ("mamba", None),
    "hybrid Md Ad": ("hybrid", "Md Ad"),  # Jamba's point: one attention layer after a Mamba layer
    "shared Md S Md S": ("hybrid", "Md S Md S"),  # Zamba: one attention block whose weights serve twice
}
# ~CPU seconds per 1000 steps of 32 x 64 tokens on one core (200-step runs timed): the slowest start first
RECALL_COST = {"mamba": 126, "shared Md S Md S": 115, "moe": 72, "hybrid Md Ad": 66, "transformer": 44}
SOLVED = 0.99  # --stop_acc of every run here
SOLVES = 0.9  # a state size "holds" a pair count when its mean accuracy reaches this


def size_of(sized, vocab, block_size):
    """'~0.10M parameters': the active-parameter target the models are matched to (the first model's)."""
    label, (model, cfg) = next(iter(sized.items()))
    return f"~{params_of(model, cfg, vocab, block_size)[1] / 1e6:.2f}M parameters"


def recall_run(lab):
    """The options every recall and mqar run shares. 1000 steps cap: the budget in which a 2-layer width-64
    Transformer solves MQAR; a run stops earlier once solved, or once val_acc has not risen for 4 evaluations."""
    run = dict(block_size=64, batch_size=32, max_iters=1000, eval_interval=100, eval_iters=4, lr=3e-3, min_lr=3e-4,
               warmup_iters=50, task_vocab=16, stop_acc=SOLVED, patience=4, extrapolate=0)
    if lab.quick:
        run.update(block_size=32, batch_size=8, max_iters=6, eval_interval=3, eval_iters=1, warmup_iters=2)
    return run


def trained(lab, cells, run):
    """cells: {key: (dataset, task fields, model file, model fields, cost)} -> {key: [Run per seed]}: every cell at
    every seed of the lab, the slowest first (the short runs fill the gaps)."""
    jobs = []
    for key in sorted(cells, key=lambda k: -cells[k][4]):
        dataset, task, model, cfg, _ = cells[key]
        for seed in lab.seed_values():
            jobs.append((f"{key}-s{seed}", [f"--model={model}", f"--dataset={dataset}", f"--seed={seed}",
                                            *config_args({**run, **task, **cfg}), f"--log_interval={run['eval_interval']}"]))
    runs = lab.train(jobs)
    return {key: [runs[f"{key}-s{s}"] for s in lab.seed_values()] for key in cells}


def accuracy_at(run, batches, block_size=None):
    """Answer accuracy of a finished run's last checkpoint on fixed batches; with block_size, of the same weights in
    a model that long (length extrapolation). nan when the run failed or the weights do not fit that length."""
    if block_size is None:
        return score_run(run, batches)[1]
    if not run.ok:
        return float("nan")
    ckpt = data.load_checkpoint(run.dir / "ckpt_last.pt")
    module = cli.MODELS[ckpt["model_name"]]
    try:
        model = module.Model(module.Config(**{**ckpt["model_config"], "block_size": block_size}))
        model.load_state_dict(ckpt["model"])
    except (ValueError, RuntimeError):  # e.g. a learned position table has no rows for the new positions
        return float("nan")
    return score(model, batches)[1]


def steps_cell(runs):
    """'400 solved, 700 solved, 1000 max_iters': the steps each run (seed) used and why it stopped."""
    return ", ".join(f"{r.final['iter']} {r.final.get('stopped', '?')}" if r.ok else f"FAILED (exit {r.rc})" for r in runs)


def flat_at(run, accuracy, baseline):
    """True for a run that train.py stopped as 'flat' with an accuracy at or below the no-recall baseline."""
    return run.ok and run.final.get("stopped") == "flat" and accuracy <= baseline


def flat_stops(cells, patience):
    """The sentence naming the runs stopped 'flat' at or below the no-recall baseline, and when the other seeds of
    their cell first rose above it in train.py's evaluations; '' if none. cells: {name: (runs, accuracies, baseline)}."""
    lines = []
    for name, (runs, accs, base) in cells.items():
        stuck = [(r, a) for r, a in zip(runs, accs) if flat_at(r, a, base)]
        if not stuck:
            continue
        rose = [next((f"step {e['iter']}" for e in r.evals if e.get("val_acc", 0) > e.get("val_baseline", 1)), "never")
                for r, a in zip(runs, accs) if r.ok and not flat_at(r, a, base)]
        lines.append(f"{name}: " + ", ".join(f"seed {r.dir.name.rsplit('-s', 1)[-1]} at {a:.3f} after {r.final['iter']} steps"
                                             for r, a in stuck)
                     + (f" (its other seeds first rose above the baseline at: {', '.join(rose)})" if rose else ""))
    if not lines:
        return ""
    return ("\n\nRuns stopped 'flat' at or below the no-recall baseline: " + "; ".join(lines) + ". A flat stop ends a "
            f"run whose accuracy has not risen for {patience} evaluations; where the other seeds of its cell left that "
            "plateau, the stopped seed might have too with more steps, so a verdict that rests on it measures the "
            "stopping rule as much as the model.")


def arch_cells(label, model, cfg, vocab, run):
    """The first cells of a recall table row: model, width, parameters (active ones in brackets)."""
    total, active, _ = params_of(model, cfg, vocab, run["block_size"])
    return [label, cfg["d_model"], f"{total:,}" + (f" ({active:,})" if active != total else "")]


def run_note(lab, run, n_val, batch):
    cap = run["max_iters"] * run["batch_size"] * run["block_size"]
    return (f"Every run: at most {run['max_iters']} iters x {run['batch_size']} sequences x {run['block_size']} tokens "
            f"({cap / 1e6:.2f}M tokens), lr {run['lr']} with cosine decay to {run['min_lr']}, {run['task_vocab']} symbols, "
            f"{lab.seeds} seed(s) per cell. A run stops at the first evaluation (every {run['eval_interval']} steps) where "
            f"its val_acc reaches {run['stop_acc']} ('solved'), or where it has not risen for {run['patience']} evaluations "
            f"('flat'), else at the cap ('max_iters'): the steps column gives each run's steps and why it stopped, seed by seed. 'Flat' is a "
            f"budget stop: a later rise (a phase change) is not ruled out. The Transformer's d_model x 2 layers sets the "
            f"active-parameter target and every other model gets the width (and depth) nearest it. Accuracy on the answers "
            f"of the same {n_val} fixed validation batches of {batch} sequences for every model and seed, from each run's "
            f"last checkpoint; mean ± sd (n). The no-recall baseline is the rule that recalls nothing (data.py's "
            f"SynthData.guess), scored on those same answers; it has no spread (one rule, one set of batches).")


def recall(lab):
    """selective copying and multi-key induction (also at 4x length) for four architectures at matched parameters"""
    run = recall_run(lab)
    tasks, labels = ["selective_copy", "multi_induction"], ["transformer", "moe", "mamba", "hybrid Md Ad"]
    d_ref, n_val, batch, stretch = 64, 16, 32, 4
    if lab.quick:
        tasks, labels, d_ref, n_val, batch = ["multi_induction"], ["transformer", "hybrid Md Ad"], 32, 2, 4
    archs = {label: (m, {"layers": p} if p else {}) for label, (m, p) in RECALL_ARCHS.items() if label in labels}
    sets = {t: data_of(t, lab.data_dir) for t in tasks}
    sized = matched_archs(archs, data_of("mqar", lab.data_dir).vocab_size, run["block_size"], d_ref, 2)
    cells = {f"{t}-{label.replace(' ', '_')}": (t, {}, m, cfg, RECALL_COST[label]) for t in tasks for label, (m, cfg) in sized.items()}
    runs = trained(lab, cells, run)
    of = lambda t, label: runs[f"{t}-{label.replace(' ', '_')}"]
    long_task = "multi_induction"
    batches = {t: fixed_batches(sets[t], n_val, batch, run["block_size"]) for t in tasks}
    long_batches = fixed_batches(sets[long_task], n_val, batch, stretch * run["block_size"])
    acc = {(t, label): [accuracy_at(r, batches[t]) for r in of(t, label)] for t in tasks for label in sized}
    acc_long = {label: [accuracy_at(r, long_batches, stretch * run["block_size"]) for r in of(long_task, label)] for label in sized}
    base = {t: no_recall(sets[t], batches[t]) for t in tasks}
    base_long = no_recall(sets[long_task], long_batches)
    head = ["model", "d_model", "params (active)"]
    for t in tasks:
        head += [f"{t} acc", f"{t} steps"]
    head.append(f"{long_task} acc @{stretch}x")
    rows, bars = [], []
    for label, (m, cfg) in sized.items():
        row = arch_cells(label, m, cfg, sets[tasks[0]].vocab_size, run)
        for t in tasks:
            row += [fmt(acc[t, label]), steps_cell(of(t, label))]
        rows.append(row + [fmt(acc_long[label])])
    rows.append(["no-recall baseline", "", ""] + [c for t in tasks for c in (f"{base[t]:.3f}", "")] + [f"{base_long:.3f}"])
    for t in tasks:
        for label in sized:
            mean, sd, n = mean_sd(acc[t, label])
            bars.append((f"{t}: {label}", mean, sd if n > 1 else 0.0))
        bars.append((f"{t}: no-recall baseline", base[t], 0.0))
    get = lambda t, label: acc.get((t, label), [])
    size = size_of(sized, sets[tasks[0]].vocab_size, run["block_size"])
    keys, symbols = sets[long_task].multi_induction_queries, sets[long_task].task_vocab

    def stuck(t, *labels):  # a claim that rests on seeds stopped flat at the baseline says so
        counts = [(label, sum(flat_at(r, a, base[t]) for r, a in zip(of(t, label), acc[t, label])))
                  for label in labels if (t, label) in acc]
        return "".join(f" ({n} of {len(of(t, label))} {label} seeds stopped flat at the baseline)" for label, n in counts if n)

    claims = [
        claim(f"Selective copying, 2 layers at {size}, up to {run['max_iters']} steps: Mamba beats the no-recall "
              f"baseline{stuck('selective_copy', 'mamba')}", "mamba", get("selective_copy", "mamba"), "the no-recall rule",
              [base.get("selective_copy", float("nan"))] * len(get("selective_copy", "mamba")), ">"),
        claim(f"Multi-key induction ({keys} keys), 2 layers at {size}, up to {run['max_iters']} steps: the "
              f"Transformer beats Mamba{stuck('multi_induction', 'transformer', 'mamba')}", "transformer",
              get("multi_induction", "transformer"), "mamba", get("multi_induction", "mamba"), ">"),
        claim(f"Multi-key induction at {stretch}x the training length of {run['block_size']}: the hybrid Md Ad (attention "
              f"without positions) beats the Transformer (RoPE)", "hybrid Md Ad", acc_long.get("hybrid Md Ad", []),
              "transformer", acc_long.get("transformer", []), ">"),
    ]
    body = (quick_note(lab) + run_note(lab, run, n_val, batch)
            + " The baseline is the most frequent data symbol for selective copying and a fixed non-key symbol for "
            f"multi-key induction (1 / ({symbols} - {keys}) with {keys} keys asked per sequence). Multi-key induction (data.py's "
            "multi_induction: several keys hidden among random symbols, each asked after '!' at the end, every answer "
            "scored) is not the Mamba paper's induction heads task; that one is `python -m lab.experiments "
            f"induction_heads`. It is also scored at {stretch}x the training length, the same weights in a model "
            f"{stretch}x as long, on {n_val} fixed batches of that length. MQAR is `python -m lab.experiments mqar` "
            "(the same run folder).\n\n" + table(head, rows)
            + "\n\nChecked against the table (a difference counts when it exceeds 2 standard errors):\n\n"
            + "\n".join(claims) + "\n\n" + unexplained(claims)
            + flat_stops({f"{t}, {label}": (of(t, label), acc[t, label], base[t]) for t in tasks for label in sized}, run["patience"]))
    lab.page("Recall: selective copying and multi-key induction", body,
             svg_bars("answer accuracy (mean, whisker: sd over seeds)", "accuracy", bars))


def mqar(lab):
    """MQAR against the number of key-value pairs at matched parameters: Transformer, Mamba, hybrids, MoE"""
    run = recall_run(lab)
    pairs = [2, 4, 8, 16]
    # Mamba against the number of pairs is mqar_state's sweep: here the two points the claims need
    grid = {"transformer": pairs, "mamba": [2, 8], "hybrid Md Ad": [8, 16], "moe": [8], "shared Md S Md S": [8]}
    d_ref, n_val, batch = 64, 16, 32
    if lab.quick:
        pairs, grid, d_ref, n_val, batch = [2, 4], {"transformer": [2, 4], "hybrid Md Ad": [2, 4]}, 32, 2, 4
    archs = {label: (m, {"layers": p} if p else {}) for label, (m, p) in RECALL_ARCHS.items() if label in grid}
    vocab = data_of("mqar", lab.data_dir).vocab_size
    sized = matched_archs(archs, vocab, run["block_size"], d_ref, 2)
    sets = {p: data_of("mqar", lab.data_dir, mqar_pairs=p) for p in pairs}
    cells = {f"mqar{p}-{label.replace(' ', '_')}": ("mqar", {"mqar_pairs": p}, *sized[label], RECALL_COST[label])
             for label, ps in grid.items() for p in ps}
    runs = trained(lab, cells, run)
    batches = {p: fixed_batches(sets[p], n_val, batch, run["block_size"]) for p in pairs}
    base = {p: no_recall(sets[p], batches[p]) for p in pairs}
    acc = {(label, p): [accuracy_at(r, batches[p]) for r in runs[f"mqar{p}-{label.replace(' ', '_')}"]]
           for label, ps in grid.items() for p in ps}
    rows, steps = [], []
    for label, (m, cfg) in sized.items():
        rows.append(arch_cells(label, m, cfg, vocab, run) + [fmt(acc[label, p]) if (label, p) in acc else "not run" for p in pairs])
        steps.append([label] + [steps_cell(runs[f"mqar{p}-{label.replace(' ', '_')}"]) if (label, p) in acc else "not run"
                                for p in pairs])
    rows.append(["no-recall baseline", "", ""] + [f"{base[p]:.3f}" for p in pairs])
    get = lambda label, p: acc.get((label, p), [])
    size = size_of(sized, vocab, run["block_size"])
    claims = [
        claim(f"MQAR, 8 pairs, 2 layers at matched parameters ({size}): the Transformer beats Mamba",
              "transformer", get("transformer", 8), "mamba", get("mamba", 8), ">"),
        claim("MQAR, 8 pairs, matched parameters: the hybrid Md Ad (one attention layer after a Mamba layer, Jamba's "
              "idea) beats Mamba", "hybrid Md Ad", get("hybrid Md Ad", 8), "mamba", get("mamba", 8), ">"),
        claim("MQAR, 8 pairs, matched parameters: Zamba's Md S Md S (one attention block shared by two depths) beats Mamba",
              "shared Md S Md S", get("shared Md S Md S", 8), "mamba", get("mamba", 8), ">"),
        claim(f"MQAR, 2 pairs, matched parameters ({size}): Mamba beats the no-recall baseline", "mamba", get("mamba", 2),
              "the no-recall rule", [base.get(2, float("nan"))] * len(get("mamba", 2)), ">"),
    ]
    body = (quick_note(lab) + run_note(lab, run, n_val, batch) + " The baseline answers the most frequent value among "
            f"the pairs.\n\nAccuracy against the number of key-value pairs at a fixed width, {sets[pairs[0]].mqar_queries} "
            "queries per sequence. "
            "Zoology (Arora et al. 2023): to recall over longer sequences, gated-convolution models needed more and more "
            "dimension and attention did not (Mamba's state against the number of pairs is `python -m lab.experiments "
            "mqar_state`); Jamba's and "
            "Zamba's answer is a little attention among the Mamba layers. Selective copying and multi-key induction are "
            "`python -m lab.experiments recall`.\n\n"
            + table(["model", "d_model", "params (active)"] + [f"{p} pairs" for p in pairs], rows)
            + "\n\nThe steps each run used and why it stopped, seed by seed:\n\n"
            + table(["model"] + [f"{p} pairs" for p in pairs], steps)
            + "\n\nChecked against the table (a difference counts when it exceeds 2 standard errors):\n\n"
            + "\n".join(claims) + "\n\n" + unexplained(claims))
    series = {label: [(p, mean_sd(acc[label, p])[0]) for p in ps] for label, ps in grid.items()}
    series["no-recall baseline"] = [(p, base[p]) for p in pairs]
    picture = svg_lines([dict(title="MQAR at matched parameters", xlabel="key-value pairs", ylabel="answer accuracy",
                              series=series, logx=True)], cols=1, width=520)
    lab.page("MQAR: recall against the number of pairs", body, picture)


def mamba_state(cfg):
    """Numbers in Mamba's recurrent state: n_layer x d_inner x d_state, d_inner = expand x d_model (the convolution's
    few taps left out)."""
    c = cli.MODELS["mamba"].Config(**cfg)
    return c.n_layer * c.expand * c.d_model * c.d_state


def mqar_state(lab):
    """Mamba's state size against the number of MQAR pairs (Zoology's figure), the Transformer as the reference"""
    run = recall_run(lab)
    pairs, d_states, d_model, n_val, batch = [2, 4, 8, 16], [1, 4, 16], 32, 16, 32
    if lab.quick:
        pairs, d_states, d_model, n_val, batch = [2, 4], [1, 4], 16, 2, 4
    vocab = data_of("mqar", lab.data_dir).vocab_size
    mamba = {ds: {"d_model": d_model, "n_layer": 2, "d_state": ds} for ds in d_states}
    attention = {"d_model": d_model, "n_layer": 2, "n_head": 4, "n_kv_head": 4}
    sets = {p: data_of("mqar", lab.data_dir, mqar_pairs=p) for p in pairs}
    cost = {1: 26, 4: 31, 16: 52}  # ~CPU seconds per 1000 steps at d_model 32, one core: the slowest start first
    cells = {f"mqar{p}-mamba_state{ds}": ("mqar", {"mqar_pairs": p}, "mamba", mamba[ds], cost.get(ds, 74))
             for ds in d_states for p in pairs}
    cells.update({f"mqar{p}-transformer": ("mqar", {"mqar_pairs": p}, "transformer", attention, 16) for p in pairs})
    runs = trained(lab, cells, run)
    batches = {p: fixed_batches(sets[p], n_val, batch, run["block_size"]) for p in pairs}
    base = {p: no_recall(sets[p], batches[p]) for p in pairs}
    acc = {(key, p): [accuracy_at(r, batches[p]) for r in runs[f"mqar{p}-{key}"]]
           for key in [f"mamba_state{ds}" for ds in d_states] + ["transformer"] for p in pairs}
    module = cli.MODELS["transformer"]
    kv = kv_bytes_per_token(module.Model(module.Config(**attention, vocab_size=vocab, block_size=run["block_size"]))) // 4
    kv_numbers = kv * run["block_size"]  # attention's "state": the KV cache at the training length, float32 numbers
    rows, holds = [], []
    for ds in d_states:
        key, n = f"mamba_state{ds}", params_of("mamba", mamba[ds], vocab, run["block_size"])[0]
        rows.append([f"Mamba, d_state {ds}", f"{mamba_state(mamba[ds]):,}", f"{n:,}"]
                    + [f"{fmt(acc[key, p])}; steps {steps_cell(runs[f'mqar{p}-{key}'])}" for p in pairs])
        held = [p for p in pairs if mean_sd(acc[key, p])[0] >= SOLVES]
        holds.append(f"d_state {ds} ({mamba_state(mamba[ds]):,} numbers): "
                     + (f"{max(held)} pairs" if held else f"none of {', '.join(map(str, pairs))} pairs"))
    n = params_of("transformer", attention, vocab, run["block_size"])[0]
    rows.append([f"Transformer (KV cache at {run['block_size']} tokens)", f"{kv_numbers:,}", f"{n:,}"]
                + [f"{fmt(acc['transformer', p])}; steps {steps_cell(runs[f'mqar{p}-transformer'])}" for p in pairs])
    rows.append(["no-recall baseline", "", ""] + [f"{base[p]:.3f}" for p in pairs])
    largest = [p for p in pairs if mean_sd(acc["transformer", p])[0] >= SOLVES]
    biggest = f"mamba_state{d_states[-1]}"
    claims = [
        claim(f"MQAR, {p} pairs, d_model {d_model}, 2 layers: Mamba with d_state {d_states[-1]} "
              f"({mamba_state(mamba[d_states[-1]]):,} state numbers) beats d_state {d_states[0]} "
              f"({mamba_state(mamba[d_states[0]]):,})", f"d_state {d_states[-1]}", acc[biggest, p],
              f"d_state {d_states[0]}", acc[f"mamba_state{d_states[0]}", p], ">") for p in pairs[:2]
    ] + [claim(f"MQAR, {pairs[-1]} pairs, d_model {d_model}, 2 layers: the Transformer beats Mamba with d_state "
               f"{d_states[-1]}", "transformer", acc["transformer", pairs[-1]], f"d_state {d_states[-1]}",
               acc[biggest, pairs[-1]], ">")]
    body = (quick_note(lab) + run_note(lab, run, n_val, batch).replace(
                "The Transformer's d_model x 2 layers sets the active-parameter target and every other model gets the "
                "width (and depth) nearest it. ", "")
            + f"\n\nZoology (Arora et al. 2023) measured MQAR against model dimension and sequence length: to recall "
            f"over longer sequences the gated-convolution models needed more and more dimension, attention did not. "
            f"Here the same question is asked of Mamba's recurrent state, one line per number of key-value pairs: a "
            f"fixed state can hold only so many pairs, attention's KV cache grows with the sequence. Mamba at d_model "
            f"{d_model}, 2 layers, with "
            f"d_state {', '.join(map(str, d_states))}: the state is n_layer x d_inner x d_state numbers (d_inner = 2 x "
            f"d_model), the parameters barely change with d_state, so the sweep separates the state from the model's "
            f"size. The Transformer (d_model {d_model}, 2 layers, 4 heads) is the reference; its KV cache at "
            f"{run['block_size']} tokens is {kv_numbers:,} numbers. Each cell: accuracy; the steps the runs used and why "
            f"they stopped.\n\n"
            + table(["model", "state (numbers)", "params"] + [f"{p} pairs" for p in pairs], rows)
            + f"\n\nThe largest pair count each state size solves (mean accuracy >= {SOLVES}), within this budget: "
            + "; ".join(holds) + f"; the Transformer: "
            + (f"{max(largest)} pairs" if largest else f"none of {', '.join(map(str, pairs))} pairs")
            + ". Where a state size solves none, that is what this budget reached, not a capacity measured: the runs "
            "that stopped 'flat' or at the cap were still short of the answer.\n\nChecked against the table (a "
            "difference counts when it exceeds 2 standard errors):\n\n" + "\n".join(claims) + "\n\n" + unexplained(claims))
    panel = dict(title="Mamba: MQAR accuracy against state size", xlabel="state size (numbers)", ylabel="answer accuracy",
                 logx=True, marks=[(kv_numbers, "attention's KV cache")],
                 series={f"{p} pairs": [(mamba_state(mamba[ds]), mean_sd(acc[f'mamba_state{ds}', p])[0]) for ds in d_states]
                         for p in pairs})
    by_pairs = dict(title="accuracy against pairs", xlabel="key-value pairs", ylabel="answer accuracy", logx=True,
                    series={**{f"Mamba d_state {ds}": [(p, mean_sd(acc[f'mamba_state{ds}', p])[0]) for p in pairs]
                               for ds in d_states},
                            "transformer": [(p, mean_sd(acc["transformer", p])[0]) for p in pairs],
                            "no-recall baseline": [(p, base[p]) for p in pairs]})
    lab.page("MQAR against Mamba's state size", body, svg_lines([panel, by_pairs], cols=2, width=420))


# ----------------------------------------------------------------------------- the Mamba paper's induction heads
# Gu & Dao 2023, section 4.1.2 and appendix E.1 (arXiv 2312.00752v2): 2-layer models, vocabulary 16, trained at
# length 256, tested at 64 to 2^20; batch 8, an "epoch" of 8192 steps; Mamba and MHA-Abs reported after 25 epochs
# (204,800 steps), MHA-RoPE and MHA-xPos after 50 (409,600); Adam without weight decay at a constant lr, the better
# of 2e-4 and 1e-3 (1e-3 for Mamba, 2e-4 for the others: attention did not learn at 1e-3). D = 64 for Mamba (74K
# parameters), 128 for the others (MHA with 8 heads, 137K). Test accuracy (%), table 3 (v2):
PAPER_STEPS = {"mamba": 204_800, "transformer": 409_600}  # the Transformer here has RoPE: MHA-RoPE's budget
PAPER_BATCH = 8
PAPER_ACC = {  # length: accuracy (%); 100 where the paper marks perfect generalisation
    "mamba": {64: 100, 128: 100, 256: 100.0, 512: 100, 1024: 100, 2048: 100},
    "transformer": {64: 100, 128: 100, 256: 100.0, 512: 83.6, 1024: 31.3, 2048: 18.4},  # MHA-RoPE
}


def induction_heads(lab):
    """the Mamba paper's induction heads: 2-layer Transformer and Mamba trained at 256 tokens, tested longer"""
    T, lengths = 256, [64, 128, 256, 512, 1024, 2048]
    common = dict(block_size=T, batch_size=PAPER_BATCH, max_iters=3000, eval_interval=200, eval_iters=16, warmup_iters=50,
                  weight_decay=0.0, task_vocab=16, stop_acc=SOLVED, extrapolate=0)
    models = {"transformer": dict(d_model=64, n_layer=2, n_head=8, n_kv_head=8, lr=2e-4, min_lr=2e-4),
              "mamba": dict(d_model=64, n_layer=2, d_state=16, lr=1e-3, min_lr=1e-3)}
    n_val, batch = 16, 8
    if lab.quick:
        T, lengths = 32, [16, 32, 64]
        common.update(block_size=T, max_iters=6, eval_interval=3, eval_iters=1, warmup_iters=2)
        models = {"transformer": dict(d_model=16, n_layer=2, n_head=2, n_kv_head=2, lr=2e-4, min_lr=2e-4),
                  "mamba": dict(d_model=16, n_layer=2, d_state=4, lr=1e-3, min_lr=1e-3)}
        n_val, batch = 2, 4
    task = data_of("induction_heads", lab.data_dir)
    cost = {"transformer": 89, "mamba": 96}  # ~CPU ms per step at 8 x 256 tokens, one core
    cells = {name: ("induction_heads", {}, name, cfg, cost[name]) for name, cfg in models.items()}
    runs = trained(lab, cells, common)
    batches = {L: fixed_batches(task, n_val, batch, L) for L in lengths}
    acc = {(name, L): [accuracy_at(r, batches[L], L) for r in runs[name]] for name in models for L in lengths}
    base = {L: no_recall(task, batches[L]) for L in lengths}
    rows = []
    for name, cfg in models.items():
        n = params_of(name, {k: v for k, v in cfg.items() if k not in ("lr", "min_lr")}, task.vocab_size, T)[0]
        rows.append([name, f"{cfg['d_model']} x 2", f"{n:,}", f"{cfg['lr']:g}", steps_cell(runs[name])]
                    + [fmt(acc[name, L]) for L in lengths])
    rows.append(["no-recall baseline", "", "", "", ""] + [f"{base[L]:.3f}" for L in lengths])
    paper = [[f"paper: {'Mamba' if name == 'mamba' else 'MHA-RoPE'}", "", "", "", f"{PAPER_STEPS[name]:,}"]
             + [f"{PAPER_ACC[name][L] / 100:.3f}" if L in PAPER_ACC[name] else "" for L in lengths] for name in models]
    sentences = []
    for name in models:
        done = [r for r in runs[name] if r.ok]
        used = max((r.final["iter"] for r in done), default=0)
        share = used * common["batch_size"] / (PAPER_STEPS[name] * PAPER_BATCH)
        curve = mean_curve(done)
        final = mean_sd(acc[name, T])[0]
        s = (f"{name}: up to {used:,} steps x {common['batch_size']} sequences = {used * common['batch_size']:,} "
             f"sequences, {share:.1%} of the paper's {PAPER_STEPS[name]:,} x {PAPER_BATCH}; accuracy at the training "
             f"length {final:.3f}. ")
        if final >= SOLVED:
            s += "Solved at the training length within this budget."
        else:
            s += (predict(curve, SOLVED, PAPER_STEPS[name]) + " Not solved here: a budget result, not a measurement of "
                  "what the architecture can hold (untested beyond this budget).")
        sentences.append("- " + s)
    long = lengths[-1]
    claims = [
        claim(f"Induction heads (Mamba paper), 2 layers, trained at {T} tokens for up to {common['max_iters']} steps of "
              f"{common['batch_size']}: Mamba beats the Transformer (RoPE) at {long // T}x that length ({long})",
              "mamba", acc["mamba", long], "transformer", acc["transformer", long], ">"),
        claim(f"Induction heads (Mamba paper), 2 layers, up to {common['max_iters']} steps of {common['batch_size']}, at "
              f"the training length {T}: the Transformer (RoPE) beats the no-recall baseline", "transformer",
              acc["transformer", T], "the no-recall rule", [base[T]] * len(acc["transformer", T]), ">"),
    ]
    body = (quick_note(lab)
            + f"The Mamba paper's induction heads (Gu & Dao 2023, section 4.1.2; data.py's induction_heads): "
            f"random symbols from {common['task_vocab']}, the special token '!' once followed by a symbol, and '!' "
            f"again at the end; the answer is the symbol that followed the first '!', and only that last answer is "
            f"scored. Trained at {T} tokens{' (the paper' + chr(39) + 's length)' if T == 256 else ''}, batch "
            f"{common['batch_size']} (the paper's), at most "
            f"{common['max_iters']} steps, stopped once val_acc reaches {SOLVED} (no 'flat' stop: induction heads "
            f"form after a plateau, Olsson et al. 2022); after a {common['warmup_iters']}-step warmup the learning "
            f"rate is constant, the paper's for each model (Mamba 1e-3, attention 2e-4), no weight decay (the paper: "
            f"Adam; here AdamW with beta2 0.99 and gradient clipping at 1.0). The paper's models: Mamba at D=64 (74K "
            f"parameters), attention at D=128 with 8 heads (137K); here Mamba at D={models['mamba']['d_model']} and a "
            f"Transformer (RoPE, {models['transformer']['n_head']} heads, with its MLP) at "
            f"D={models['transformer']['d_model']} (parameters in the table). Tested by the same weights in a longer model on {n_val} fixed batches of "
            f"{batch} sequences at each length, every model and seed on the same batches; mean ± sd (n). The no-recall "
            f"baseline answers the most frequent symbol of the sequence (a little above 1/16: the answer is among the "
            f"symbols it counts).\n\n"
            + table(["model", "d_model x layers", "params", "lr", "steps"] + [f"acc @{L}" for L in lengths], rows + paper)
            + "\n\nThe paper's rows are its table 3 (test accuracy; 1.000 where it marks perfect generalisation) after "
            "the steps shown, at batch 8.\n\nHow far these runs got against the paper's budget, and what the learning "
            "curves say:\n\n" + "\n".join(sentences)
            + "\n\nChecked against the table (a difference counts when it exceeds 2 standard errors):\n\n"
            + "\n".join(claims) + "\n\n" + unexplained(claims))
    curves = {f"{name}, seed {r_i}": [(e["iter"], e["val_acc"]) for e in r.evals]
              for name in models for r_i, r in zip(lab.seed_values(), runs[name]) if r.ok}
    learning = dict(title=f"learning curves at {T} tokens", xlabel="step", ylabel="val_acc", series=curves)
    by_length = dict(title="accuracy against test length", xlabel="test length (tokens)", ylabel="answer accuracy",
                     logx=True, marks=[(T, "trained")],
                     series={**{name: [(L, mean_sd(acc[name, L])[0]) for L in lengths] for name in models},
                             "no-recall baseline": [(L, base[L]) for L in lengths]})
    lab.page("Induction heads (the Mamba paper's task): length extrapolation and the training budget", body,
             svg_lines([learning, by_length], cols=2, width=420))


def mean_curve(runs):
    """[(step, mean val_acc)] over the runs at every step any of them evaluated; a run that stopped (solved) keeps
    its last value."""
    steps = sorted({e["iter"] for r in runs for e in r.evals})
    at = lambda r, s: [e["val_acc"] for e in r.evals if e["iter"] <= s][-1]
    return [(s, sum(at(r, s) for r in runs) / len(runs)) for s in steps]


def predict(curve, target, paper_steps, last=5):
    """A sentence: the least-squares line through the last evaluations of a mean learning curve, and where it would
    reach the target; or, where its slope is within 2 standard errors of zero, that the curve is flat."""
    pts = curve[-last:]
    if len(pts) < 3:
        return "Too few evaluations to read a trend."
    n, mx, my = len(pts), sum(s for s, _ in pts) / len(pts), sum(a for _, a in pts) / len(pts)
    sxx = max(1e-12, sum((s - mx) ** 2 for s, _ in pts))
    slope = sum((s - mx) * (a - my) for s, a in pts) / sxx
    residual = sum((a - my - slope * (s - mx)) ** 2 for s, a in pts) / (n - 2)
    span = pts[-1][0] - pts[0][0]
    if slope <= 2 * math.sqrt(residual / sxx):  # no rise above the scatter of the points
        return (f"Over its last {span:,} steps the mean curve moved {slope * span:+.3f}, within its own scatter: flat, "
                f"so it gives no estimate of when it would be solved.")
    at = pts[-1][0] + (target - pts[-1][1]) / slope
    return (f"Over its last {span:,} steps the mean curve rose {slope * span:+.3f}; a straight line through them "
            f"reaches {target} near step {at:,.0f} ({at / paper_steps:.1%} of the paper's steps) — a line, where "
            f"learning curves of this task are not straight.")
