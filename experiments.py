"""
Experiments: each idea of the course switched on with a flag and measured, one command each.

    python experiments.py --help              # the experiments, one line each
    python experiments.py ladder              # the full run (<= 15 min on 2 CPU cores)
    python experiments.py ladder --quick      # a minute: the same code on a tiny budget
    python experiments.py ladder --seeds=3 --out=results

Every experiment trains through train.py itself (one process per run, OMP_NUM_THREADS=1, --jobs
runs at once), reads the runs' metrics.jsonl, and writes OUT/NAME.md (the tables, the exact
commands, the machine, the wall time) and OUT/NAME.svg (a picture), and prints the tables.
A run whose directory already holds a finished run with the same arguments is read, not redone:
an interrupted experiment picks up where it stopped. Runs live in OUT/runs/NAME/ (not committed;
ladder_alone reads and writes OUT/runs/ladder/, mqar OUT/runs/recall/: they share runs).
"""
import collections
import concurrent.futures
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from html import escape as esc
from pathlib import Path

import torch

import cli
import data
import train
from train import COLOURS, svg_lines

REPO = Path(__file__).resolve().parent


# Experiments that read each other's runs: a run with the same label and arguments is trained once (labels of
# runs with other arguments differ, so nothing is overwritten)
RUN_FOLDER = {"ladder_alone": "ladder", "mqar": "recall"}


class Lab:
    """What every experiment gets: where to write, how many seeds, the quick switch, and `train`,
    which runs train.py over a list of runs and returns their metrics."""

    def __init__(self, name, opts):
        self.name, self.quick, self.seeds, self.jobs = name, opts["quick"], opts["seeds"], opts["jobs"]
        self.out, self.data_dir = Path(opts["out"]), opts["data_dir"]
        self.runs_dir = self.out / "runs" / RUN_FOLDER.get(name, name)
        self.commands = []  # every train.py command line, for the page
        self.reused = []  # runs read from an earlier invocation: their training time is not in this one's wall time
        self.t0 = time.time()

    def train(self, runs, then=None):
        """runs: [(label, [--name=value, ...])]. Each runs as `python train.py ARGS --out_dir=...`, `jobs` at
        once. `then(label, run)` may return more runs, which start before the ones still waiting (a second
        seed where the first came out close). Returns {label: Run}; a failed run has rc != 0, never dropped."""
        waiting, running, done = collections.deque(runs), {}, {}
        with concurrent.futures.ThreadPoolExecutor(self.jobs) as pool:
            while waiting or running:
                while waiting and len(running) < self.jobs:
                    label, args = waiting.popleft()
                    args = [*args, f"--data_dir={self.data_dir}", f"--out_dir={self.runs_dir / label}"]
                    self.commands.append(shlex.join(["python", "train.py", *args]))
                    running[pool.submit(train_once, args, self.runs_dir / label)] = label
                finished, _ = concurrent.futures.wait(running, return_when=concurrent.futures.FIRST_COMPLETED)
                for f in finished:
                    label = running.pop(f)
                    run = done[label] = f.result()
                    if run.reused:
                        self.reused.append(run)
                    status = (f"val {run.final['val_loss']:.4f}" if run.ok else f"FAILED (exit {run.rc}; {run.dir / 'log.txt'})")
                    print(f"  [{len(done)}/{len(done) + len(running) + len(waiting)}] {label}: {status} in {run.seconds:.0f}s"
                          f"{' (reused)' if run.reused else ''}", flush=True)
                    waiting.extendleft(reversed(then(label, run) if then else []))
        return done

    def page(self, title, body, picture=None):
        """Write OUT/NAME.md (and OUT/NAME.svg from picture=svg text) and print the body."""
        self.out.mkdir(parents=True, exist_ok=True)
        cmd = f"python experiments.py {self.name}" + (" --quick" if self.quick else "") + \
              (f" --seeds={self.seeds}" if self.seeds != DEFAULT_SEEDS else "")
        runs = "\n".join(self.commands)
        text = (f"# {title}\n\n`{cmd}` — {machine()}, {self.jobs} run(s) at once with one thread each, "
                f"wall time {(time.time() - self.t0) / 60:.1f} min"
                + (f" ({len(self.reused)} of the runs below were read from finished runs with the same arguments in "
                   f"{self.runs_dir}, not rerun: their time is not in this wall time)" if self.reused else "") + f".\n\n{body.strip()}\n\n"
                + (f"![{self.name}]({self.name}.svg)\n\n" if picture else "")
                + f"<details><summary>The {len(self.commands)} training runs</summary>\n\n```\n{runs}\n```\n</details>\n")
        (self.out / f"{self.name}.md").write_text(text)
        if picture:
            (self.out / f"{self.name}.svg").write_text(picture)
        print("\n" + body.strip() + f"\n\nwrote {self.out / self.name}.md" + (" and .svg" if picture else ""))


class Run:
    def __init__(self, run_dir, rc, seconds, reused):
        self.dir, self.rc, self.seconds, self.reused = run_dir, rc, seconds, reused
        rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()] \
            if (run_dir / "metrics.jsonl").is_file() else []
        self.evals = [r for r in rows if "val_loss" in r]  # one row per evaluation
        self.steps = [r for r in rows if "loss" in r]  # one row per training step
        self.ok = rc == 0 and bool(self.evals)
        self.final = self.evals[-1] if self.evals else {}

    def ms_per_step(self):
        """Training time per optimizer step (evaluation and checkpoints excluded)."""
        return 1000 * self.final["train_time"] / max(1, self.final["iter"]) if self.ok else float("nan")


def train_once(args, run_dir):
    """One train.py process; reuse a finished run made with exactly these arguments."""
    stamp = run_dir / "args.json"
    done = json.loads(stamp.read_text()) if stamp.is_file() else {}
    if done.get("args") == args and done.get("rc") == 0:
        return Run(run_dir, 0, done.get("seconds", float("nan")), reused=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    stamp.unlink(missing_ok=True)
    t0 = time.time()
    with open(run_dir / "log.txt", "w") as log:
        rc = subprocess.run([sys.executable, str(REPO / "train.py"), *args], stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=REPO).returncode
    seconds = time.time() - t0
    stamp.write_text(json.dumps({"args": args, "rc": rc, "seconds": seconds}))
    return Run(run_dir, rc, seconds, reused=False)


def machine():
    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                if l.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").is_file() else platform.processor()
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{cpu or platform.machine()} ({os.cpu_count()} cores{gpu}), torch {torch.__version__}"


# ----------------------------------------------------------------------------- tables and pictures


def mean_spread(values, spec=".3f"):
    """'1.234 ± 0.005' (mean ± half the range) over seeds; the bare value for one seed."""
    values = [v for v in values if v == v]
    if not values:
        return "n/a"
    mean = sum(values) / len(values)
    if len(values) == 1:
        return format(mean, spec)
    return f"{format(mean, spec)} ± {format((max(values) - min(values)) / 2, spec)}"


def table(header, rows):
    """Markdown table from a header list and rows of cells (anything str() can print)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def svg_bars(title, xlabel, bars, width=640, origin=None):
    """Horizontal bars: [(label, value, spread)]; the spread is drawn as a whisker. The axis starts at
    `origin`, or a little below the smallest bar (losses: the differences are what matters)."""
    row, top = 22, 34
    left = max(120, 6 * max(len(label) for label, _, _ in bars) + 16)  # ~6 px per character at font-size 11
    width = max(width, left + 360, 7 * len(title) + 20)  # room for the bars and the (bold) title
    vals = [v + (s or 0) for _, v, s in bars if v == v]
    lo = min(v - (s or 0) for _, v, s in bars if v == v) if vals else 0
    lo, hi = (lo - 0.1 * (max(vals) - lo + 1e-9) if origin is None else origin), max(vals) if vals else 1
    w = width - left - 60
    X = lambda v: left + w * (v - lo) / ((hi - lo) or 1)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{top + row * len(bars) + 40}" '
           f'font-family="sans-serif" font-size="11">', '<rect width="100%" height="100%" fill="white"/>',
           f'<text x="{width / 2}" y="16" text-anchor="middle" font-weight="bold">{esc(title)}</text>']
    for i, (label, v, s) in enumerate(bars):
        y = top + row * i
        out.append(f'<text x="{left - 6}" y="{y + 14}" text-anchor="end">{esc(label)}</text>')
        if v == v:
            out.append(f'<rect x="{left}" y="{y + 3}" width="{max(1, X(v) - left):.1f}" height="14" fill="{COLOURS[0]}"/>'
                       f'<text x="{X(v) + 4 + (X(v + s) - X(v) if s else 0):.1f}" y="{y + 14}">{v:.3f}</text>')
            if s:
                out.append(f'<line x1="{X(v - s):.1f}" x2="{X(v + s):.1f}" y1="{y + 10}" y2="{y + 10}" stroke="black"/>')
    out.append(f'<text x="{left + w / 2}" y="{top + row * len(bars) + 24}" text-anchor="middle">{esc(xlabel)} '
               f'(axis from {lo:.3g})</text>')
    return "\n".join(out + ["</svg>"]) + "\n"


# ----------------------------------------------------------------------------- the experiments
# Each is a function(lab) that trains through lab.train and writes its page with lab.page.


def model_module(name):
    return cli.MODELS[name]


def data_of(dataset, data_dir, **opts):
    """The dataset as train.py will see it (vocab_size; a text's train split)."""
    o = {**{k: v for k, (v, _) in train.OPTIONS.items()}, "dataset": dataset, "data_dir": data_dir, **opts}
    return train.load_data(o)


def vocab_of(dataset, data_dir, **opts):
    return data_of(dataset, data_dir, **opts).vocab_size


def active_params(name, **cfg):
    module = model_module(name)
    return module.Model(module.Config(**cfg)).num_params(active=True)


def matched_size(name, fixed, vocab_size, block_size, target, d_ref, n_ref):
    """(d_model, n_layer, active params) of model `name` nearest `target` active parameters (per token:
    for a Mixture-of-Experts model the experts a token is routed to, not all of them; embeddings count).
    Among those within 5% of the target, the width nearest d_ref, then the depth nearest n_ref. A layer
    pattern in `fixed` fixes the depth."""
    found = []
    pattern_sets_depth = "n_layer" in fixed or "layers" in fixed
    for n_layer in ([None] if pattern_sets_depth else range(max(1, n_ref // 2), 2 * n_ref + 1)):
        for d_model in range(max(8, d_ref // 4), 2 * d_ref + 1, 4):
            cfg = {**fixed, "vocab_size": vocab_size, "block_size": block_size, "d_model": d_model,
                   **({"n_layer": n_layer} if n_layer else {})}
            try:
                n = active_params(name, **cfg)
            except ValueError:  # e.g. a width the head count does not divide
                continue
            found.append((d_model, n_layer, n))
    close = [f for f in found if abs(f[2] - target) <= 0.05 * target]
    if close:
        return min(close, key=lambda f: (abs(f[0] - d_ref), abs((f[1] or n_ref) - n_ref), abs(f[2] - target)))
    return min(found, key=lambda f: abs(f[2] - target))


def matched_archs(archs, vocab_size, block_size, d_ref, n_ref):
    """{label: (model, Config overrides)} with every model sized to the first one's active parameters.
    archs: {label: (model, fixed overrides)}."""
    (ref_label, (ref_model, ref_fixed)), out = next(iter(archs.items())), {}
    target = active_params(ref_model, **ref_fixed, vocab_size=vocab_size, block_size=block_size, d_model=d_ref,
                           n_layer=n_ref)
    for label, (model, fixed) in archs.items():
        if label == ref_label:
            out[label] = (model, {**fixed, "d_model": d_ref, "n_layer": n_ref})
            continue
        d, n, _ = matched_size(model, fixed, vocab_size, block_size, target, d_ref, n_ref)
        out[label] = (model, {**fixed, "d_model": d, **({"n_layer": n} if n else {})})
    return out


def config_args(cfg):
    return [f"--{k}={v}" for k, v in cfg.items()]


def params_of(model, cfg, vocab_size, block_size):
    module = model_module(model)
    m = module.Model(module.Config(**cfg, vocab_size=vocab_size, block_size=block_size))
    return m.num_params(), m.num_params(active=True), m.flops_per_token()


@torch.no_grad()
def measure_decode(model, cfg, vocab_size, context, steps):
    """Tokens/s of one-token steps at the end of a `context`-token sequence (the median step: on shared
    cores a few get descheduled), and the bytes the cache holds there. Random weights: speed and memory
    do not depend on their values; block_size = context (a position table or KV cache is sized by it)."""
    module = model_module(model)
    torch.manual_seed(0)
    m = module.Model(module.Config(**cfg, vocab_size=vocab_size, block_size=context)).eval()
    idx = torch.randint(vocab_size, (1, context))  # (1, context)
    cache = m.new_cache(1)
    for start in range(0, context - steps, 512):  # chunked prefill: bounded memory for the attention scores
        m(idx[:, start:min(start + 512, context - steps)], cache=cache)
    times = []
    for t in range(context - steps, context):
        t0 = time.perf_counter()
        m(idx[:, t:t + 1], cache=cache)
        times.append(time.perf_counter() - t0)
    return 1 / sorted(times)[len(times) // 2], m.cache_bytes(cache)


def fit_parabola(xs, ys):
    """Least-squares y = a x^2 + b x + c -> (a, b, c)."""
    import numpy as np
    return tuple(float(v) for v in np.polyfit(xs, ys, 2))


def fit_power_law(xs, ys):
    """Least squares on logs: y = k x^a -> (a, k)."""
    import numpy as np
    a, logk = np.polyfit(np.log(xs), np.log(ys), 1)
    return float(a), float(math.exp(logk))


def architectures(lab):
    """the four models at matched active parameters and equal tokens: text and recall tasks, costs, decoding at long context"""
    datasets = ["pydoc", *data.SYNTHETIC] if not lab.quick else ["mqar"]
    run = dict(block_size=64, batch_size=16, max_iters=1200, eval_interval=100, eval_iters=10, lr=2e-3, min_lr=2e-4,
               warmup_iters=50)
    context, steps = (4096, 64) if not lab.quick else (256, 16)
    if lab.quick:
        run.update(max_iters=4, eval_interval=2, eval_iters=2, warmup_iters=2)
    archs = {"transformer": ("transformer", {}), "moe": ("moe", {}), "mamba": ("mamba", {}),
             "hybrid": ("hybrid", {"layers": "Md Me Ad Me"})}  # Jamba's block at a quarter of the depth
    text, synthetic = datasets[0], [ds for ds in datasets if ds in data.SYNTHETIC]
    vocabs = {ds: vocab_of(ds, lab.data_dir) for ds in datasets}
    sized = matched_archs(archs, vocabs[text], run["block_size"], 64, 2)  # sizes chosen on the text, kept for all
    runs = [(f"{ds}-{label}", [f"--model={m}", f"--dataset={ds}", *config_args({**run, **cfg}),
                               f"--log_interval={run['eval_interval']}"])
            for ds in datasets for label, (m, cfg) in sized.items()]
    results = lab.train(runs)
    cost, learned, curves = [], [], {}
    for label, (m, cfg) in sized.items():
        params, active, flops = params_of(m, cfg, vocabs[text], run["block_size"])
        r = results[f"{text}-{label}"]
        tok_s = r.final["tokens"] / r.final["train_time"] if r.ok and r.final.get("train_time") else float("nan")
        dec, cache = measure_decode(m, cfg, vocabs[text], context, steps)
        shape = f"{cfg['d_model']} x {cfg.get('n_layer', len(cfg.get('layers', '').split()))}"
        cost.append([label, shape, f"{params / 1e6:.3f}M", f"{active / 1e6:.3f}M", f"{flops / 1e6:.2f}",
                     f"{tok_s:,.0f}", f"{dec:,.0f}", f"{cache / 2**20:.2f} MiB"])
        row = [label] + [mean_spread([results[f"{ds}-{label}"].final.get("val_loss", float("nan"))]) for ds in datasets]
        for ds in synthetic:
            f = results[f"{ds}-{label}"].final
            row.append(f"{mean_spread([f.get('val_acc', float('nan'))])} ({mean_spread([f.get('val_baseline', float('nan'))])})")
        if "induction" in datasets:
            row.append(mean_spread([results[f"induction-{label}"].final.get("val_acc_4x", float("nan"))]))
        learned.append(row)
        for ds in datasets:
            curves.setdefault(ds, {})[label] = [(e["tokens"], e["val_loss"]) for e in results[f"{ds}-{label}"].evals]
    head = ["model"] + [f"{ds} val loss" for ds in datasets] + [f"{ds} acc (no-recall)" for ds in synthetic] \
        + (["induction acc @4x"] if "induction" in datasets else [])
    tokens = run["max_iters"] * run["batch_size"] * run["block_size"]
    body = (f"Every run: {run['max_iters']} iters x {run['batch_size']} x {run['block_size']} = {tokens / 1e6:.2f}M "
            f"training tokens, lr {run['lr']}, the same options for every model (nothing tuned per architecture). "
            f"Sizes: the Transformer at d_model 64 x 2 layers sets the active-parameter target on `{text}`; every "
            f"other model gets the width (and depth) nearest it, kept for all datasets. The hybrid is Jamba's block "
            f"at a quarter of the depth, Md Me Ad Me.\n\n"
            f"Costs on `{text}` (decoding: batch 1, median of {steps} one-token steps after a {context - steps}-token "
            f"prefill, float32, random weights, {torch.get_num_threads()} thread(s), in this process after training):\n\n"
            + table(["model", "d_model x n_layer", "params", "active", "MFLOPs/token", "train tok/s",
                     f"decode tok/s @{context}", f"cache @{context}"], cost)
            + "\n\nWhat each learned: validation loss (the synthetic tasks: on the answers only), answer accuracy with "
            "the no-recall baseline measured on the same answers in brackets (val_baseline), and induction "
            "at 4x the training length:\n\n" + table(head, learned))
    panels = [dict(title=ds, xlabel="training tokens", ylabel="validation loss", series=curves[ds]) for ds in datasets]
    lab.page("The architectures side by side", body, svg_lines(panels))


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
        return [job(task, label, seed + 1)] if close and seed + 1 < 1337 + lab.seeds else []

    first = sorted(which, key=lambda k: -RECALL_COST[k[1]])  # slowest first: the short runs fill the gaps
    lab.train([job(task, label, 1337) for task, label in first], then=then)
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
            "scored at 4x the training length. MQAR, and where Mamba's fixed state runs out, is `python "
            "experiments.py mqar` (the same run folder).\n\n" + table(head, rows)
            + "\n\n<!-- lead: interpretation -->\n")
    lab.page("Recall: selective copying and induction", body,
             svg_bars("answer accuracy (whisker: half the range over seeds)", "accuracy", bars, origin=0))


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
            "Selective copying and induction are `python experiments.py recall`.\n\n"
            + table(["model", "d_model", "params (active)"] + [f"{p} pairs" for p in pairs], rows)
            + "\n\n<!-- lead: interpretation -->\n")
    series = {label: [(p, mean(accuracies(results, f"mqar{p}", label))) for p in ps] for label, ps in grid.items()}
    series["no-recall baseline"] = [(p, no_recall(results, f"mqar{p}")) for p in pairs]
    picture = svg_lines([dict(title="MQAR at a fixed width", xlabel="key-value pairs", ylabel="answer accuracy",
                              series=series, logx=True)], cols=1, width=520)
    lab.page("MQAR: recall against the number of pairs", body, picture)


def moe(lab):
    """dense vs Mixture-of-Experts at equal active parameters and equal tokens; expert load over training"""
    # Character-level tiny Shakespeare (1.0M characters, vocabulary 65): the embedding is a few thousand
    # parameters, so "equal active parameters" is about the blocks, where MoE adds its experts. With GPT-2
    # BPE (50K vocabulary) the embedding and the head would be 6.4M parameters at d_model 64, dwarfing the
    # feed-forward layers MoE multiplies, on a 338K-token corpus that a model of that size memorises.
    run = dict(dataset="shakespeare_char", block_size=128, batch_size=16, max_iters=2000, eval_interval=200,
               eval_iters=10, lr=2e-3, min_lr=2e-4, warmup_iters=100, d_model=64, n_layer=4, n_head=4)
    if lab.quick:
        run.update(block_size=32, batch_size=4, max_iters=4, eval_interval=2, eval_iters=1, warmup_iters=1,
                   d_model=48, n_layer=1)
    d_ff = model_module("moe").Config(d_model=run["d_model"]).d_ff  # the dense model's SwiGLU hidden size
    variants = {  # label: (model, fields); every MoE routes each token through d_ff of expert width in all
        "dense": ("transformer", {}),
        "MoE 8 x top-1": ("moe", dict(n_expert=8, top_k=1)),  # Switch: one full-size expert per token
        "MoE 16 x top-2, half-width": ("moe", dict(n_expert=16, top_k=2, d_expert=d_ff // 2)),  # fine-grained
    }
    seeds = range(1337, 1337 + lab.seeds)
    names = {f"{v.split(' ')[0]}{i}-s{seed}": (v, seed) for i, v in enumerate(variants) for seed in seeds}
    results = lab.train([(name, [f"--model={variants[v][0]}", f"--seed={seed}",
                                 *config_args({**run, **variants[v][1]}), f"--log_interval={run['eval_interval']}"])
                         for name, (v, seed) in names.items()])
    by = {v: [r for name, r in results.items() if names[name][0] == v] for v in variants}
    corpus = data_of(run["dataset"], lab.data_dir)
    vocab, train_tokens = corpus.vocab_size, len(corpus.train)
    shape = {k: run[k] for k in ("d_model", "n_layer", "n_head")}
    dense_ms = sum(r.ms_per_step() for r in by["dense"]) / len(by["dense"])
    rows, curves, load = [], {}, {}
    for v, (m, fields) in variants.items():
        total, active, flops = params_of(m, {**shape, **fields}, vocab, run["block_size"])
        fin = lambda key: [r.final.get(key, float("nan")) for r in by[v]]
        ms = sum(r.ms_per_step() for r in by[v]) / len(by[v])
        rows.append([v, f"{total:,}", f"{active:,}", f"{flops / 1e6:.2f}", mean_spread(fin("val_loss")),
                     mean_spread(fin("train_loss")), f"{ms / dense_ms:.2f}x"]
                    + ([mean_spread(fin("moe_ent"), ".2f"), mean_spread(fin("moe_vio"), ".2f"),
                        mean_spread(fin("moe_dead"), ".0f")] if m == "moe" else ["", "", ""]))
        first = by[v][0]
        curves[v] = [(e["tokens"], e["val_loss"]) for e in first.evals]
        if m == "moe":
            load[v] = first.evals
    tokens = run["max_iters"] * run["batch_size"] * run["block_size"]
    body = (f"Character-level tiny Shakespeare ({train_tokens:,} training tokens), d_model {run['d_model']} x "
            f"{run['n_layer']} layers, {run['max_iters']} iters x {run['batch_size']} x {run['block_size']} = "
            f"{tokens / 1e6:.2f}M training tokens ({tokens / train_tokens:.1f} epochs), lr {run['lr']}, "
            f"{lab.seeds} seed(s) each. Every MoE layer replaces the SwiGLU feed-forward (hidden {d_ff}) and routes "
            f"each token through the same {d_ff} of expert width: top-1 of full-size experts (Switch), or top-2 of "
            f"half-width ones (fine-grained, DeepSeekMoE), so active parameters and FLOPs per token match the dense "
            f"model (plus the router) while total parameters grow with the experts. Active parameters count the embedding and the output layer. Load statistics are the MoE layers' mean at the last "
            f"evaluation: entropy of the expert load / ln E (1 = uniform), max load / mean load - 1, experts "
            f"that got no token. Step time is relative to the dense model in the same experiment (CPU, shared "
            f"machine: a ratio, not a speed claim).\n\n"
            + table(["model", "params", "active", "MFLOPs/token", "val loss", "train loss", "time/step",
                     "load entropy", "max violation", "dead experts"], rows))
    panels = [dict(title="validation loss", xlabel="training tokens", ylabel="val loss", series=curves),
              dict(title="expert load over training", xlabel="training tokens", ylabel="load entropy / ln E",
                   series={v: [(e["tokens"], e["moe_ent"]) for e in evals if "moe_ent" in e] for v, evals in load.items()}),
              dict(title="max load over training", xlabel="training tokens", ylabel="max load / mean load - 1",
                   series={v: [(e["tokens"], e["moe_vio"]) for e in evals if "moe_vio" in e] for v, evals in load.items()})]
    lab.page("Dense vs Mixture-of-Experts at equal active parameters", body, svg_lines(panels, cols=3, width=340))


def scaling(lab):
    """a Chinchilla iso-FLOP mini-sweep: U-curves of loss against size at three budgets, N_opt against C"""
    import numpy as np
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


EXPERIMENTS = {  # name: function; the first line of its docstring is its --help line
    "architectures": architectures, "recall": recall, "mqar": mqar, "moe": moe, "scaling": scaling,
}


# ---- ladder, positions, norms, attention: the Transformer's switches, GPT-2 to modern
# Shared by these four: runs are labelled NAME-sSEED; seeds start at 0; quick mode is one seed of a
# tiny model for a handful of steps (it checks the code path, not the claim).

# quick mode trains on the built-in corpus (its windows are as good as any for a code-path check), so the test
# suite needs no download
QUICK_SHAPE = ["--dataset=pydoc", "--d_model=32", "--n_layer=1", "--n_head=4", "--block_size=32", "--batch_size=4", "--max_iters=6",
               "--eval_interval=6", "--eval_iters=1", "--warmup_iters=2", "--log_interval=6"]
SHAKESPEARE = ["config/shakespeare_char.py"]
GPT2 = ["config/shakespeare_char.py", "config/gpt2_style.py"]


def seeded(lab, configs):
    """configs: [(key, args)] -> lab.train over every seed; returns {key: [Run per seed]}."""
    seeds = 1 if lab.quick else lab.seeds
    runs = lab.train([(f"{key}-s{s}", [*args, f"--seed={s}", *(QUICK_SHAPE if lab.quick else [])])
                      for key, args in configs for s in range(seeds)])
    return {key: [runs[f"{key}-s{s}"] for s in range(seeds)] for key, _ in configs}


def quick_note(lab):
    return ("\n**Quick mode**: a code-path check on the built-in corpus (`--dataset=pydoc`), a tiny model and a few "
            "steps, one seed: these numbers say nothing about the claim.\n" if lab.quick else "")


def final_val(runs):
    """Final val loss of each seed; a failed run is nan (shown, never dropped)."""
    return [r.final.get("val_loss", float("nan")) if r.ok else float("nan") for r in runs]


def failed(runs):
    bad = [f"seed {i}: exit {r.rc}" for i, r in enumerate(runs) if not r.ok]
    return f" (FAILED {', '.join(bad)})" if bad else ""


def model_of(args, quick):
    """The model train.py builds from these arguments (vocab 65: tiny Shakespeare's characters)."""
    args = [str(REPO / a) if a.endswith(".py") else a for a in args]  # presets are relative to the repository
    _, overrides, module = train.parse_args([*args, *(QUICK_SHAPE if quick else [])])
    return module.Model(module.Config(**{**overrides, "vocab_size": 65}))


def cpu_ms_per_step(models, quick, batch_size=12):
    """Training step (forward, backward, AdamW) of each model side by side in this process, rounds
    interleaved, CPU time of this process: the shared machine disturbs that far less than wall time."""
    torch.set_num_threads(1)  # one thread, like the training runs: side-by-side times on one core
    from bench import timed_rounds, train_step
    steps = {k: train_step(m, batch_size, m.config.block_size, 65) for k, m in models.items()}
    secs = timed_rounds(steps, rounds=2 if quick else 5, steps=1 if quick else 5, clock=time.process_time)
    return {k: 1000 * s for k, s in secs.items()}


def kv_bytes_per_token(model):
    return model.cache_bytes(model.new_cache(1, max_len=1))  # one position, all layers, float32


def ladder(lab):
    """GPT-2 to a modern LLaMA-style block, one change at a time (cumulative), on tiny Shakespeare"""
    modern = ["--pos=rope", "--norm=rmsnorm", "--ffn=swiglu"]
    steps = [("gpt2", "GPT-2 style (learned, LayerNorm, GELU, MHA)", GPT2),
             ("rope", "+ RoPE", GPT2 + ["--pos=rope"]),
             ("rmsnorm", "+ RoPE + RMSNorm", GPT2 + modern[:2]),
             ("swiglu", "+ RoPE + RMSNorm + SwiGLU", GPT2 + modern),
             ("gqa", "+ ... + GQA 4:2", GPT2 + modern + ["--n_kv_head=2"]),
             ("default", "+ ... + GQA 4:2 + PyTorch's init, untied head (this repository's default)", SHAKESPEARE)]
    if lab.quick:  # four rows: each train.py process costs seconds of start-up alone
        steps = [s for s in steps if s[0] in ("gpt2", "rope", "gqa", "default")]
    ladder_page(lab, steps, "The ladder: GPT-2 to modern, one change at a time", """Cumulative: each row
below GPT-2 style adds one change to the row above it, all with GPT-2's initialisation (N(0, 0.02), tied
embeddings); the last row then switches to this repository's default initialisation (PyTorch's defaults, untied
head), which is the modern default model exactly. Each change alone (MQA among them) and the original
Transformer's ReLU feed-forward are `python experiments.py ladder_alone`; MHA, GQA and MQA side by side at the
modern recipe are `python experiments.py attention`. (Six rows at two seeds fill the 15-minute budget.)""")


def ladder_alone(lab):
    """each step of the ladder alone on GPT-2 style (ReLU, RoPE, RMSNorm, SwiGLU, MQA), tiny Shakespeare"""
    steps = [("gpt2", "GPT-2 style (learned, LayerNorm, GELU, MHA)", GPT2),
             ("relu", "ReLU instead of GELU (original Transformer)", GPT2 + ["--ffn=relu"]),
             ("rope", "+ RoPE only", GPT2 + ["--pos=rope"]),
             ("rmsnorm-only", "+ RMSNorm only", GPT2 + ["--norm=rmsnorm"]),
             ("swiglu-only", "+ SwiGLU only", GPT2 + ["--ffn=swiglu"]),
             ("mqa-only", "+ MQA 4:1 only", GPT2 + ["--n_kv_head=1"])]
    if lab.quick:
        steps = [s for s in steps if s[0] in ("gpt2", "swiglu-only", "mqa-only")]
    ladder_page(lab, steps, "The ladder, each change alone on GPT-2 style", """Each row changes one thing,
alone, in GPT-2 style: which of them helps on its own, and which only together (`python experiments.py
ladder` adds them one after the other, GQA 4:2 among them). The rows GPT-2 style and + RoPE are the same runs as
in the ladder.""")


def ladder_page(lab, steps, title, order):
    evals = ["--eval_interval=500"]  # five evaluations instead of nine: the budget goes to training steps
    runs = seeded(lab, [(key, args + evals) for key, _, args in steps])
    models = {key: model_of(args, lab.quick) for key, _, args in steps}
    ms = cpu_ms_per_step(models, lab.quick)
    base = sum(final_val(runs["gpt2"])) / len(runs["gpt2"])
    rows, bars = [], []
    for key, label, _ in steps:
        v = final_val(runs[key])
        mean = sum(v) / len(v)
        spread = (max(v) - min(v)) / 2 if len(v) > 1 else 0.0
        rows.append([label + failed(runs[key]), mean_spread(v), f"{mean - base:+.3f}", f"{models[key].num_params():,}",
                     f"{ms[key]:.1f}", f"{kv_bytes_per_token(models[key]):,}"])
        bars.append((label, mean, spread))
    m = models["gpt2"].config
    shape = f"{m.n_layer} layers, {m.n_head} heads, width {m.d_model}, context {m.block_size}"
    n_iter = runs["gpt2"][0].final.get("iter", "?")
    body = quick_note(lab) + f"""
Does each change from GPT-2 (Radford et al. 2019) to the LLaMA recipe (Touvron et al. 2023) lower the
loss at a fixed budget, and what does it cost? The changes: rotary positions (RoPE, Su et al. 2021), RMSNorm
(Zhang & Sennrich 2019), the SwiGLU feed-forward (Shazeer 2020, which reports lower perplexity than ReLU
and GELU at equal parameters), and grouped-query / multi-query attention (Ainslie et al. 2023; Shazeer 2019),
which shrink the KV cache at a small quality cost. {order}

Tiny Shakespeare, characters, {shape}, batch 12, {n_iter} iterations (nanoGPT's CPU recipe,
config/shakespeare_char.py; GPT-2 style adds config/gpt2_style.py), {len(runs['gpt2'])} seed(s) per row.
Val loss: the final evaluation (20 batches), mean ± half the range over seeds. CPU ms/step: one training step
(batch 12) of every model measured side by side in this process, rounds interleaved, in CPU process time
(the machine may be shared: compare rows, not machines). KV cache: float32 bytes per token of context, all
layers.

{table(["model", "val loss", "vs GPT-2 style", "parameters", "CPU ms/step", "KV cache bytes/token"], rows)}

What this shows: the loss of each step at this one small budget, and the measured cost per step; the KV
cache column is arithmetic (2 x layers x K/V heads x head dim x 4 bytes). What it does not show: whether an
ordering holds at scale or longer training, or differences smaller than the spread between seeds.

<!-- lead: interpretation -->
"""
    lab.page(title, body,
             svg_bars(f"final val loss, {shape}, {n_iter} iterations (whisker: half the range over seeds)",
                      "val loss", bars))


EXPERIMENTS["ladder"] = ladder
EXPERIMENTS["ladder_alone"] = ladder_alone


@torch.no_grad()
def position_losses(ckpt_path, factor, scaling, windows):
    """Mean loss at each position 0 .. factor*T-1 of `windows` (N, 4T+1) val windows, for the model of a
    checkpoint stretched to factor x its block_size (RoPE angles rescaled by `scaling`). None when the
    weights cannot run that long (learned positions have no rows past T)."""
    import torch.nn.functional as F
    ckpt = data.load_checkpoint(ckpt_path)
    trained, _ = data.model_from_checkpoint(ckpt)
    cfg = dict(ckpt["model_config"], block_size=factor * trained.config.block_size)
    if scaling != "none":
        cfg.update(rope_scaling=scaling, rope_factor=float(factor))
    module = sys.modules[type(trained).__module__]
    try:
        model = module.Model(module.Config(**cfg))
        model.load_state_dict(ckpt["model"])
    except (ValueError, RuntimeError):
        return None
    model.eval()
    L = factor * trained.config.block_size
    x, y = windows[:, :L], windows[:, 1:L + 1]  # (N, L) each
    total = torch.zeros(L)
    for i in range(0, x.size(0), 8):  # 8 windows per forward: bounded memory at 4T
        logits, _ = model(x[i:i + 8])
        total += F.cross_entropy(logits.transpose(1, 2), y[i:i + 8], reduction="none").sum(0)  # (L,)
    return total / x.size(0)


def positions(lab):
    """position schemes trained at context T, evaluated at 1x, 2x, 4x T (loss beyond T apart); RoPE PI/NTK"""
    schemes = [("learned", "learned (GPT-2)"), ("sinusoidal", "sinusoidal (Vaswani et al.)"), ("rope", "RoPE"),
               ("alibi", "ALiBi"), ("none", "none (NoPE)")]
    if lab.quick:
        schemes = [s for s in schemes if s[0] in ("learned", "rope", "alibi")]
    train_args = SHAKESPEARE + ["--max_iters=1200", "--eval_interval=400", "--n_kv_head=4"]
    runs = seeded(lab, [(key, train_args + [f"--pos={key}"]) for key, _ in schemes])
    val = data.TextData("pydoc" if lab.quick else "shakespeare_char", lab.data_dir).val
    T = model_of(train_args, lab.quick).config.block_size
    n_windows = 16 if lab.quick else 128
    gen = torch.Generator().manual_seed(0)  # the same windows for every model
    start = torch.randint(len(val) - 4 * T - 1, (n_windows,), generator=gen)
    windows = val[start[:, None] + torch.arange(4 * T + 1)]  # (N, 4T+1)
    rows_def = [(key, label, "none") for key, label in schemes]
    at = next(i for i, (key, _, _) in enumerate(rows_def) if key == "rope") + 1  # PI and NTK right after RoPE
    rows_def[at:at] = [("rope", "RoPE + position interpolation (PI)", "pi"), ("rope", "RoPE + NTK-aware scaling", "ntk")]
    rows, curves = [], {}
    for key, label, scaling in rows_def:
        per_factor = {}
        for f in (1, 2, 4):
            got = [position_losses(r.dir / "ckpt_last.pt", f, scaling, windows) for r in runs[key] if r.ok]
            per_factor[f] = None if not got or got[0] is None else torch.stack(got)  # (seeds, fT)
        cells = [label + failed(runs[key])]
        for f in (1, 2, 4):
            p = per_factor[f]
            if p is None:
                cells += ["cannot run past T: no learned embedding for those positions" if key == "learned" else "n/a", "-"]
                continue
            if f == 1:
                cells.append(mean_spread(p[:, :T].mean(1).tolist()))
            else:
                cells += [mean_spread(p[:, :T].mean(1).tolist()), mean_spread(p[:, T:].mean(1).tolist())]
        rows.append(cells)
        longest = next((per_factor[f] for f in (4, 2, 1) if per_factor[f] is not None), None)
        if longest is not None:
            bucket = max(1, T // 8)
            mean = longest.mean(0)
            curves[label] = [(i + bucket / 2, mean[i:i + bucket].mean().item()) for i in range(0, mean.numel(), bucket)]
    header = ["positions", f"1x: 0..{T - 1}", f"2x: 0..{T - 1}", f"2x: {T}..{2 * T - 1}", f"4x: 0..{T - 1}",
              f"4x: {T}..{4 * T - 1}"]
    body = quick_note(lab) + f"""
How well does each position scheme work at the trained context T = {T}, and past it? Press et al. (2021,
ALiBi) report that sinusoidal and rotary positions degrade quickly beyond the training length while ALiBi
extrapolates; learned absolute positions (GPT-2) have no embedding past T at all. Models without positional
information (NoPE) still learn order from the causal mask (Haviv et al. 2022; Kazemnejad et al. 2023, who also
report better length generalisation than the explicit schemes). For RoPE, position interpolation (Chen et al.
2023) and NTK-aware base scaling (bloc97 2023; YaRN, Peng et al. 2023) stretch the rotation angles at
evaluation time without retraining; Chen et al. fine-tune after interpolating, which is not done here.

Each scheme trained on tiny Shakespeare (characters; config/shakespeare_char.py with MHA and the flag in the
row), {len(runs['rope'])} seed(s). The trained checkpoint (last step) is then evaluated in this process at 1x, 2x
and 4x T on the same {n_windows} validation windows: mean loss on the first T positions and, separately, on the
positions beyond T (so they are not diluted by the first T). PI and NTK rows reuse the RoPE checkpoints, with
the angles rescaled by the evaluation factor (1x is plain RoPE). Mean ± half the range over seeds.

{table(header, rows)}

What this shows: the loss per position range of each scheme at and beyond the trained length, on one small
character-level model. What it does not show: long-context ability (a character model needs little far context),
or PI/NTK after the short fine-tuning their papers use.

<!-- lead: interpretation -->
"""
    lab.page("Positions: trained at T, evaluated at 1x, 2x, 4x T", body,
             svg_lines([dict(title=f"loss against position (longest evaluation; trained at T = {T})", xlabel="position",
                             ylabel="val loss", series=curves)], width=720, height=340, cols=1))


EXPERIMENTS["positions"] = positions


def norm_speed(quick):
    """Forward + backward of the norm alone at a few (tokens, width) shapes, side by side in CPU time;
    and how far the written-out RMSNorm formula is from F.rms_norm (float32)."""
    torch.set_num_threads(1)  # one thread, like the training runs: side-by-side times on one core
    from bench import timed_rounds
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


EXPERIMENTS["norms"] = norms


@torch.no_grad()
def decode_ms(kv_heads, contexts, quick):
    """Next-token time against a KV cache of each context, batch 1, 8 query heads of 32, 4 layers,
    side by side in CPU time; random weights (time does not depend on them)."""
    torch.set_num_threads(1)  # one thread, like the training runs: side-by-side times on one core
    from bench import timed_rounds
    import model_transformer
    fns = {}
    for K in kv_heads:
        torch.manual_seed(0)
        m = model_transformer.Model(model_transformer.Config(vocab_size=65, d_model=256, n_layer=4, n_head=8, n_kv_head=K,
                                                             block_size=max(contexts) + 1)).eval()
        for ctx in contexts:
            cache = m.new_cache(1, max_len=ctx + 1)
            m(torch.randint(0, 65, (1, ctx)), cache=cache)  # prefill

            def step(m=m, cache=cache):
                m(torch.zeros(1, 1, dtype=torch.long), cache=cache)
                cache.len -= 1  # stay at ctx: every call times the same step
            fns[K, ctx] = step
    secs = timed_rounds(fns, rounds=2 if quick else 5, steps=2 if quick else 10, clock=time.process_time)
    return {k: 1000 * s for k, s in secs.items()}


def attention_memory(quick):
    """Peak extra resident memory and time of causal attention fwd+bwd (B=1, fp32): the explicit formula
    (kernels.attention_ref) against the tiled path (kernels.attention on the CPU: torch's SDPA flash
    kernel), sweeping T, then the head dim D, then the number of heads H. Uses bench.peak_rss_mib."""
    torch.set_num_threads(1)  # one thread, like the training runs: side-by-side times on one core
    import kernels
    from bench import peak_rss_mib, timed_rounds
    paths = {"explicit": lambda q, k, v: kernels.attention_ref(q, k, v, causal=True),
             "tiled": lambda q, k, v: kernels.attention(q, k, v, causal=True, impl="torch")}
    if quick:
        sweeps = [("T", [(4, 128, 32), (4, 256, 32)]), ("D", [(4, 256, 16), (4, 256, 64)]), ("H", [(1, 256, 32), (4, 256, 32)])]
    else:
        sweeps = [("T", [(4, T, 64) for T in (512, 1024, 2048)]), ("D", [(4, 1024, D) for D in (16, 64, 256)]),
                  ("H", [(H, 1024, 64) for H in (1, 4, 16)])]
    for fn in paths.values():  # warm-up: one-time allocations are not the method's
        q, k, v = (torch.randn(1, 2, 64, 16, requires_grad=True) for _ in range(3))
        fn(q, k, v).sum().backward()
    rows, curves = [], {}  # curves: {sweep: {path: [(x, MiB)]}}
    for what, shapes in sweeps:
        for H, T, D in shapes:
            gen = torch.Generator().manual_seed(0)
            q, k, v, do = (torch.randn(1, H, T, D, generator=gen) for _ in range(4))
            q, k, v = (x.requires_grad_() for x in (q, k, v))
            step = {name: (lambda fn=fn: torch.autograd.grad(fn(q, k, v), (q, k, v), do)) for name, fn in paths.items()}
            mib = {name: min(peak_rss_mib(s)[0] for _ in range(2)) for name, s in step.items()}  # lower of two
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
    decode_rows = [[f"{8}:{2 * K} ({label.split()[0]})", *(f"{ms[2 * K, c]:.2f}" for c in contexts)] for K, label in heads]
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
call (Linux VmHWM; bench.peak_rss_mib, lower of two runs), CPU time (median of interleaved rounds), and the
largest difference between the two outputs. One sweep at a time: T, then D, then H.

{mem}

What this shows: the KV cache and decode cost of each variant (bytes are arithmetic, times are measured side by
side), their loss at one small budget, and on this CPU how attention memory and time scale with T, D and H for
the explicit formula and the tiled kernel. What it does not show: GPU kernels (see bench.py attention), or
quality at scale, where the head count matters more.

<!-- lead: interpretation -->
"""
    panels = [dict(title="decode: next token after a context", xlabel="context (tokens)", ylabel="CPU ms/token",
                   series={f"8:{2 * K} K/V heads": [(c, ms[2 * K, c]) for c in contexts] for K, _ in heads}, logx=True)]
    lab.page("Attention: MHA, GQA, MQA and FlashAttention", body, svg_lines(panels + mem_panels, cols=2))


EXPERIMENTS["attention"] = attention

# ----------------------------------------------------------------------------- main

DEFAULT_SEEDS = 2
OPTIONS = {
    "quick": (False, "a tiny budget (about a minute): checks the code path, not the claim"),
    "seeds": (DEFAULT_SEEDS, "seeds per configuration"),
    "out": ("results", "where NAME.md and NAME.svg go (runs in OUT/runs/NAME/)"),
    "jobs": (2, "training runs at once (one thread each)"),
    "data_dir": ("data", "train.py's --data_dir"),
}


def main(argv):
    from cli import UsageError, die, read_args, typed
    if not argv or "-h" in argv or "--help" in argv:
        print(__doc__.strip(), "\n\nexperiments:")
        for name, fn in EXPERIMENTS.items():
            print(f"  {name:<12} {fn.__doc__.strip().splitlines()[0]}")
        print("\noptions:")
        for name, (default, text) in OPTIONS.items():
            print(f"  {f'--{name}={default}':<22} {text}")
        return
    try:
        name, rest = argv[0], argv[1:]
        if name not in EXPERIMENTS:
            raise UsageError(f"unknown experiment {name!r}; choose from {', '.join(EXPERIMENTS)}")
        given = typed(read_args(rest), {k: type(v) for k, (v, _) in OPTIONS.items()}, script="experiments.py")
        opts = {k: given.get(k, v) for k, (v, _) in OPTIONS.items()}
        if opts["seeds"] < 1 or opts["jobs"] < 1:
            raise UsageError("seeds and jobs must be >= 1")
    except UsageError as e:
        die(str(e))
    lab = Lab(name, opts)
    print(f"experiment {name}{' (quick)' if lab.quick else ''}: {lab.seeds} seed(s), {lab.jobs} run(s) at once, "
          f"out {lab.out}", flush=True)
    EXPERIMENTS[name](lab)


if __name__ == "__main__":
    main(sys.argv[1:])
