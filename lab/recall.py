"""
Recall against matched parameters: selective copying and induction (recall), and MQAR against the
number of key-value pairs (mqar), for the Transformer, MoE, Mamba and the hybrids (Jamba, Zamba).
"""
from lab.charts import svg_bars, svg_lines
from lab.measure import table
from lab.runner import config_args, matched_archs, mean_spread, params_of, quick_note, vocab_of


RECALL_ARCHS = {  # label: (model file, hybrid layer pattern); the first sets the parameter target
    "transformer": ("transformer", None),
    "moe": ("moe", None),
    "mamba": ("mamba", None),
    "hybrid Md Ad": ("hybrid", "Md Ad"),  # Jamba's point: one attention layer after a Mamba layer
    "shared Md S Md S": ("hybrid", "Md S Md S"),  # Zamba: one attention block whose weights serve twice
}
RECALL_COST = {"mamba": 185, "shared Md S Md S": 150, "hybrid Md Ad": 110, "moe": 80, "transformer": 45}  # ~s per run, one core


def recall_runs(lab, tasks, which):
    """Train `which` [(task, arch label)] of the recall grid (tasks: {task: fields}); returns (results {(task, arch):
    [Run per seed]}, sized {label: (model, fields)}, run fields, vocab)."""
    # 1000 steps, the budget in which a 2-layer width-64 Transformer solves MQAR (train.py's own reference run);
    # a 400-step pilot left every model short of it (selective copying: Transformer 0.69, Mamba 0.36)
    run = dict(block_size=64, batch_size=32, max_iters=1000, eval_interval=200, eval_iters=8, lr=3e-3, min_lr=3e-4,
               warmup_iters=50, task_vocab=16)
    if lab.quick:
        run.update(block_size=32, max_iters=6, eval_interval=3, eval_iters=1, warmup_iters=2)
    archs = {label: (m, {"layers": pattern} if pattern else {}) for label, (m, pattern) in RECALL_ARCHS.items()
             if any(label == arch for _, arch in which)}
    vocab = vocab_of("mqar", lab.data_dir)
    sized = matched_archs(archs, vocab, run["block_size"], 64 if not lab.quick else 32, 2)
    results, meta = {key: [] for key in which}, {}

    def job(task, label, seed):
        name = f"{task}-{label.replace(' ', '_')}-s{seed}"
        meta[name] = (task, label, seed)
        return name, [f"--model={sized[label][0]}", f"--dataset={task.rstrip('0123456789')}", f"--seed={seed}",
                      *config_args({**run, **tasks[task], **sized[label][1]}), f"--log_interval={run['eval_interval']}"]

    def then(name, r):  # one more seed (up to --seeds) where a run is neither solved nor at its baseline:
        task, label, seed = meta[name]  # there a second seed decides whether the architectures really differ
        results[task, label].append(r)
        close = any(r.ok and r.final["val_baseline"] + 0.03 < r.final["val_acc"] < 0.97 for r in results[task, label])
        return [job(task, label, seed + 1)] if close and seed + 1 in lab.seed_values() else []

    first = sorted(which, key=lambda k: -RECALL_COST[k[1]])  # slowest first: the short runs fill the gaps
    lab.train([job(task, label, lab.first_seed) for task, label in first], then=then)
    return results, sized, run, vocab


def arch_cells(label, model, cfg, vocab, run):
    """The first cells of a recall table row: model, width, parameters (active ones in brackets)."""
    total, active, _ = params_of(model, cfg, vocab, run["block_size"])
    return [label, cfg["d_model"], f"{total:,}" + (f" ({active:,})" if active != total else "")]


def accuracies(results, task, arch, key="val_acc"):
    return [r.final.get(key, float("nan")) for r in results.get((task, arch), [])]


def no_recall(results, task):
    """The no-recall rule's accuracy on this task, averaged over every run of it (each scores it on its answers)."""
    values = [v for (t, a) in results if t == task for v in accuracies(results, t, a, "val_baseline")]
    return sum(values) / len(values) if values else float("nan")


def recall_note(run):
    tokens = run["max_iters"] * run["batch_size"] * run["block_size"]
    return (f"Every run: {run['max_iters']} iters x {run['batch_size']} sequences x {run['block_size']} tokens "
            f"({tokens / 1e6:.2f}M tokens), lr {run['lr']}, {run['task_vocab']} symbols; the Transformer's "
            f"d_model x 2 layers sets the active-parameter target and every other model gets the width (and depth) "
            f"nearest it. Accuracy on the answers only, from the last evaluation; 'no-recall baseline' is the rule "
            f"that recalls nothing, scored on the same answers (data.py's SynthData.guess). A second seed (up to "
            f"--seeds) runs where the first is neither solved (>= 0.97) nor at its baseline; ± is half the range "
            f"over seeds.")


def recall(lab):
    """selective copying and induction (also at 4x length) for the four architectures at matched parameters"""
    tasks = {"selective_copy": {}, "induction": {}}
    labels = ["transformer", "moe", "mamba", "hybrid Md Ad"]
    if lab.quick:
        tasks, labels = {"induction": {}}, ["transformer", "hybrid Md Ad"]
    results, sized, run, vocab = recall_runs(lab, tasks, [(t, a) for t in tasks for a in labels])
    cell = lambda task, arch, key="val_acc": mean_spread(accuracies(results, task, arch, key), ".2f")
    head = ["model", "d_model", "params (active)"] + [f"{t} acc" for t in tasks] + ["induction @4x"]
    rows, bars = [], []
    for label, (m, cfg) in sized.items():
        rows.append(arch_cells(label, m, cfg, vocab, run) + [cell(t, label) for t in tasks]
                    + [cell("induction", label, "val_acc_4x")])
    rows.append(["no-recall baseline", "", ""] + [f"{no_recall(results, t):.2f}" for t in tasks] + ["n/a"])
    for t in tasks:
        for label in sized:
            acc = accuracies(results, t, label)
            bars.append((f"{t}: {label}", sum(acc) / len(acc), (max(acc) - min(acc)) / 2 if len(acc) > 1 else 0.0))
        bars.append((f"{t}: no-recall baseline", no_recall(results, t), 0.0))
    body = (quick_note(lab) + recall_note(run) + " The baseline is the most frequent data symbol for selective "
            "copying, and a fixed non-key symbol for induction (1 / (16 - 4) with 4 keys asked per sequence; "
            "induction has 4 scored answers per sequence so that it is learned in this budget). Induction is also "
            "scored at 4x the training length. MQAR, and where Mamba's fixed state runs out, is `python -m "
            "lab.experiments mqar` (the same run folder).\n\n" + table(head, rows)
            + "\n\n<!-- lead: interpretation -->\n")
    lab.page("Recall: selective copying and induction", body,
             svg_bars("answer accuracy (whisker: half the range over seeds)", "accuracy", bars))


def mqar(lab):
    """MQAR against the number of key-value pairs: where Mamba's fixed state runs out; hybrids and Zamba"""
    pairs = [2, 4, 8, 16]
    grid = {"transformer": pairs, "mamba": pairs[:3], "hybrid Md Ad": pairs,  # Mamba: at the baseline from 4 pairs on
            "moe": [8],  # MoE's recall is the Transformer's attention: one point
            "shared Md S Md S": [8, 16]}  # Zamba: the two hardest (both to fit the budget)
    if lab.quick:
        pairs, grid = [2, 4], {"transformer": [2, 4], "hybrid Md Ad": [2, 4]}
    tasks = {f"mqar{p}": dict(mqar_pairs=p) for p in pairs}
    results, sized, run, vocab = recall_runs(lab, tasks, [(f"mqar{p}", a) for a, ps in grid.items() for p in ps])
    mean = lambda values: sum(values) / len(values) if values else float("nan")
    cell = lambda task, arch: mean_spread(accuracies(results, task, arch), ".2f") if (task, arch) in results else "not run"
    rows = []
    for label, (m, cfg) in sized.items():
        rows.append(arch_cells(label, m, cfg, vocab, run) + [cell(f"mqar{p}", label) for p in pairs])
    rows.append(["no-recall baseline", "", ""] + [f"{no_recall(results, f'mqar{p}'):.2f}" for p in pairs])
    body = (quick_note(lab) + recall_note(run) + " The baseline answers the most frequent value among the pairs.\n\n"
            "Accuracy against the number of key-value pairs at a fixed width, 8 queries per sequence. Zoology "
            "(Arora et al. 2023): attention solves MQAR at any width, a recurrent model needs a state that grows "
            "with the number of pairs; Jamba's and Zamba's answer is a little attention among the Mamba layers. "
            "Selective copying and induction are `python -m lab.experiments recall`.\n\n"
            + table(["model", "d_model", "params (active)"] + [f"{p} pairs" for p in pairs], rows)
            + "\n\n<!-- lead: interpretation -->\n")
    series = {label: [(p, mean(accuracies(results, f"mqar{p}", label))) for p in ps] for label, ps in grid.items()}
    series["no-recall baseline"] = [(p, no_recall(results, f"mqar{p}")) for p in pairs]
    picture = svg_lines([dict(title="MQAR at a fixed width", xlabel="key-value pairs", ylabel="answer accuracy",
                              series=series, logx=True)], cols=1, width=520)
    lab.page("MQAR: recall against the number of pairs", body, picture)
