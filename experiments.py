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
an interrupted experiment picks up where it stopped. Runs live in OUT/runs/NAME/ (not committed).
"""
import concurrent.futures
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent
COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#7f7f7f", "#17becf"]


class Lab:
    """What every experiment gets: where to write, how many seeds, the quick switch, and `train`,
    which runs train.py over a list of runs and returns their metrics."""

    def __init__(self, name, opts):
        self.name, self.quick, self.seeds, self.jobs = name, opts["quick"], opts["seeds"], opts["jobs"]
        self.out, self.data_dir = Path(opts["out"]), opts["data_dir"]
        self.runs_dir = self.out / "runs" / name
        self.commands = []  # every train.py command line, for the page
        self.t0 = time.time()

    def train(self, runs):
        """runs: [(label, [--name=value, ...])]. Each runs as `python train.py ARGS --out_dir=...`.
        Returns {label: Run}. A failed run is reported and returned with rc != 0, never dropped."""
        jobs = [(label, [*args, f"--data_dir={self.data_dir}", f"--out_dir={self.runs_dir / label}"])
                for label, args in runs]
        self.commands += [shlex.join(["python", "train.py", *args]) for _, args in jobs]
        done = {}
        with concurrent.futures.ThreadPoolExecutor(self.jobs) as pool:
            futures = {pool.submit(train_once, args, self.runs_dir / label): label for label, args in jobs}
            for f in concurrent.futures.as_completed(futures):
                run = done[futures[f]] = f.result()
                status = (f"val {run.final['val_loss']:.4f}" if run.ok else f"FAILED (exit {run.rc}; {run.dir / 'log.txt'})")
                print(f"  [{len(done)}/{len(jobs)}] {futures[f]}: {status} in {run.seconds:.0f}s"
                      f"{' (reused)' if run.reused else ''}", flush=True)
        return done

    def page(self, title, body, picture=None):
        """Write OUT/NAME.md (and OUT/NAME.svg from picture=svg text) and print the body."""
        self.out.mkdir(parents=True, exist_ok=True)
        cmd = f"python experiments.py {self.name}" + (" --quick" if self.quick else "") + \
              (f" --seeds={self.seeds}" if self.seeds != DEFAULT_SEEDS else "")
        runs = "\n".join(self.commands)
        text = (f"# {title}\n\n`{cmd}` — {machine()}, {self.jobs} run(s) at once with one thread each, "
                f"wall time {(time.time() - self.t0) / 60:.1f} min.\n\n{body.strip()}\n\n"
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
    if stamp.is_file() and json.loads(stamp.read_text()) == {"args": args, "rc": 0}:
        return Run(run_dir, 0, 0.0, reused=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    stamp.unlink(missing_ok=True)
    t0 = time.time()
    with open(run_dir / "log.txt", "w") as log:
        rc = subprocess.run([sys.executable, str(REPO / "train.py"), *args], stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=REPO).returncode
    stamp.write_text(json.dumps({"args": args, "rc": rc}))
    return Run(run_dir, rc, time.time() - t0, reused=False)


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


def svg_lines(panels, width=380, height=260, cols=2):
    """Hand-written SVG line charts (no plotting library). panels: [dict(title, xlabel, ylabel,
    series={name: [(x, y), ...]}, logx=False, logy=False)]. One legend for all panels."""
    names = list(dict.fromkeys(n for p in panels for n in p["series"]))
    colour = {n: COLOURS[i % len(COLOURS)] for i, n in enumerate(names)}
    rows_n = math.ceil(len(panels) / cols)
    legend_h = 16 * math.ceil(len(names) / 4) + 10
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width * min(cols, len(panels))}" '
           f'height="{height * rows_n + legend_h}" font-family="sans-serif" font-size="11">',
           '<rect width="100%" height="100%" fill="white"/>']
    for i, n in enumerate(names):
        x, y = 10 + 170 * (i % 4), 12 + 16 * (i // 4)
        out.append(f'<rect x="{x}" y="{y - 5}" width="14" height="4" fill="{colour[n]}"/>'
                   f'<text x="{x + 18}" y="{y}">{esc(n)}</text>')
    for k, p in enumerate(panels):
        ox, oy = (k % cols) * width, legend_h + (k // cols) * height
        left, top, w, h = ox + 55, oy + 22, width - 75, height - 62
        out.append(f'<text x="{left + w / 2}" y="{oy + 14}" text-anchor="middle" font-weight="bold">{esc(p["title"])}</text>'
                   f'<rect x="{left}" y="{top}" width="{w}" height="{h}" fill="none" stroke="#888"/>'
                   f'<text x="{left + w / 2}" y="{top + h + 30}" text-anchor="middle">{esc(p["xlabel"])}</text>'
                   f'<text transform="translate({ox + 12},{top + h / 2}) rotate(-90)" text-anchor="middle">'
                   f'{esc(p["ylabel"])}</text>')
        pts = [(x, y) for s in p["series"].values() for x, y in s if y == y and math.isfinite(y)]
        if not pts:
            continue
        fx = math.log10 if p.get("logx") else (lambda v: v)
        fy = math.log10 if p.get("logy") else (lambda v: v)
        x0, x1 = min(fx(x) for x, _ in pts), max(fx(x) for x, _ in pts)
        y0, y1 = min(fy(y) for _, y in pts), max(fy(y) for _, y in pts)
        x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)
        X = lambda v: left + w * (fx(v) - x0) / (x1 - x0)
        Y = lambda v: top + h * (1 - (fy(v) - y0) / (y1 - y0))
        for t in range(5):  # ticks, in data units
            xv, yv = x0 + (x1 - x0) * t / 4, y0 + (y1 - y0) * t / 4
            xv, yv = (10 ** xv if p.get("logx") else xv), (10 ** yv if p.get("logy") else yv)
            out.append(f'<text x="{X(xv):.1f}" y="{top + h + 14}" text-anchor="middle">{xv:.3g}</text>'
                       f'<text x="{left - 4}" y="{Y(yv) + 4:.1f}" text-anchor="end">{yv:.3g}</text>')
        for n, s in p["series"].items():
            s = [(x, y) for x, y in s if y == y and math.isfinite(y)]
            line = " ".join(f"{X(x):.1f},{Y(y):.1f}" for x, y in s)
            out.append(f'<polyline points="{line}" fill="none" stroke-width="2" stroke="{colour[n]}"/>' if len(s) > 1
                       else "".join(f'<circle cx="{X(x):.1f}" cy="{Y(y):.1f}" r="3" fill="{colour[n]}"/>' for x, y in s))
    return "\n".join(out + ["</svg>"]) + "\n"


def svg_bars(title, xlabel, bars, width=640):
    """Horizontal bars: [(label, value, spread)]; the spread is drawn as a whisker."""
    row, left, top = 22, 230, 34
    vals = [v + (s or 0) for _, v, s in bars if v == v]
    lo = min(v - (s or 0) for _, v, s in bars if v == v) if vals else 0
    lo, hi = lo - 0.1 * (max(vals) - lo + 1e-9), max(vals) if vals else 1
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


def esc(s):
    return str(s).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


# ----------------------------------------------------------------------------- the experiments
# Each is a function(lab) that trains through lab.train and writes its page with lab.page.


def model_module(name):
    import train
    return train.MODELS[name]


def data_of(dataset, data_dir, **opts):
    """The dataset as train.py will see it (vocab_size; a text's train split)."""
    import train
    o = {**{k: v for k, (v, _) in train.OPTIONS.items()}, "dataset": dataset, "data_dir": data_dir, **opts}
    return train.SynthData(o) if dataset in train.SYNTHETIC else train.TextData(o)


def vocab_of(dataset, data_dir, **opts):
    return data_of(dataset, data_dir, **opts).vocab_size


def hybrid_fields(pattern):
    """Config fields of model_hybrid that build this layer pattern ("Md Ad": Mamba + dense feed-forward,
    then attention + dense; "S": the shared attention block). None when this model_hybrid cannot."""
    import dataclasses
    fields = {f.name for f in dataclasses.fields(model_module("hybrid").Config)}
    if "layers" in fields:
        return {"layers": pattern}
    # FALLBACK for a model_hybrid without the `layers` string: its periodic attn_/moe_every/offset fields
    kinds = pattern.split()
    if any(k[0] not in "AM" for k in kinds):
        return None  # a shared block needs `layers`
    n = len(kinds)
    for a_every in range(1, n + 2):
        for a_off in range(a_every):
            for e_every in range(1, n + 2):
                for e_off in range(e_every):
                    if all((k[0] == "A") == (i % a_every == a_off) and (k[1] == "e") == (i % e_every == e_off)
                           for i, k in enumerate(kinds)):
                        return dict(n_layer=n, attn_every=a_every, attn_offset=a_off, moe_every=e_every, moe_offset=e_off)
    return None


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
    archs: {label: (model, fixed overrides or None when this code cannot build it)}."""
    (ref_label, (ref_model, ref_fixed)), out = next(iter(archs.items())), {}
    target = active_params(ref_model, **ref_fixed, vocab_size=vocab_size, block_size=block_size, d_model=d_ref,
                           n_layer=n_ref)
    for label, (model, fixed) in archs.items():
        if fixed is None:
            continue
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
    import train
    datasets = ["pydoc", *train.SYNTHETIC] if not lab.quick else ["mqar"]
    run = dict(block_size=64, batch_size=16, max_iters=1200, eval_interval=100, eval_iters=10, lr=2e-3, min_lr=2e-4,
               warmup_iters=50)
    context, steps = (4096, 64) if not lab.quick else (256, 16)
    if lab.quick:
        run.update(max_iters=4, eval_interval=2, eval_iters=2, warmup_iters=2)
    archs = {"transformer": ("transformer", {}), "moe": ("moe", {}), "mamba": ("mamba", {}),
             "hybrid": ("hybrid", hybrid_fields("Md Me Ad Me"))}  # Jamba's block at a quarter of the depth
    text, synthetic = datasets[0], [ds for ds in datasets if ds in train.SYNTHETIC]
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
            "the no-recall baseline measured on the same answers in brackets (train.py's val_baseline), and induction "
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


def recall(lab):
    """selective copying, induction and MQAR for the four architectures at matched parameters; where Mamba's state runs out"""
    run = dict(block_size=64, batch_size=32, max_iters=400, eval_interval=80, eval_iters=8, lr=3e-3, min_lr=3e-4,
               warmup_iters=50, task_vocab=16)
    pairs = [2, 4, 8, 16]  # MQAR difficulty at a fixed width (8 queries each)
    tasks = {"selective_copy": {}, "induction": {}, **{f"mqar{p}": dict(mqar_pairs=p) for p in pairs}}
    archs = {label: (m, hybrid_fields(pattern) if pattern else {}) for label, (m, pattern) in RECALL_ARCHS.items()}
    if lab.quick:
        run.update(block_size=32, max_iters=6, eval_interval=3, eval_iters=1, warmup_iters=2)
        pairs = [2, 4]
        tasks = {"induction": {}, **{f"mqar{p}": dict(mqar_pairs=p) for p in pairs}}
        archs = {k: archs[k] for k in ("transformer", "hybrid Md Ad")}
    vocab = vocab_of("mqar", lab.data_dir)
    sized = matched_archs(archs, vocab, run["block_size"], 64 if not lab.quick else 32, 2)

    results = {(task, label): [] for task in tasks for label in sized  # (task, arch): [Run per seed]
               if task.startswith("mqar") or not label.startswith("shared")}  # Zamba's row: MQAR only (time)
    for seed in range(1337, 1337 + lab.seeds):
        # the first seed everywhere; more only where a run is neither solved nor at its baseline: there a
        # second seed decides whether the architectures really differ
        which = [k for k, rs in results.items() if not rs or any(
            r.ok and r.final["val_baseline"] + 0.03 < r.final["val_acc"] < 0.97 for r in rs)]
        names = {f"{task}-{label.replace(' ', '_')}-s{seed}": (task, label) for task, label in which}
        done = lab.train([(name, [f"--model={sized[label][0]}", f"--dataset={task.rstrip('0123456789')}",
                                  f"--seed={seed}", *config_args({**run, **tasks[task], **sized[label][1]}),
                                  f"--log_interval={run['eval_interval']}"]) for name, (task, label) in names.items()])
        for name, r in done.items():
            results[names[name]].append(r)
    acc = lambda task, arch, key="val_acc": [r.final.get(key, float("nan")) for r in results.get((task, arch), [])]
    cell = lambda task, arch, key="val_acc": mean_spread(acc(task, arch, key), ".2f") if results.get((task, arch)) else "not run"
    mean = lambda values: sum(values) / len(values) if values else float("nan")
    base_of = lambda task: mean([v for a in sized for v in acc(task, a, "val_baseline")])  # same rule, every run
    base = lambda task: mean_spread([base_of(task)], ".2f")
    vocab_params = {label: params_of(m, cfg, vocab, run["block_size"]) for label, (m, cfg) in sized.items()}
    head, rows = ["model", "d_model", "params (active)"], []
    cols = [t for t in tasks if not t.startswith("mqar")] + ["mqar8" if 8 in pairs else f"mqar{pairs[-1]}"]
    head += [f"{t} acc" for t in cols] + (["induction @4x"] if "induction" in tasks else [])
    for label, (m, cfg) in sized.items():
        total, active, _ = vocab_params[label]
        rows.append([label, cfg["d_model"], f"{total:,}" + (f" ({active:,})" if active != total else "")]
                    + [cell(t, label) for t in cols] + ([cell("induction", label, "val_acc_4x")] if "induction" in tasks else []))
    rows.append(["no-recall baseline", "", ""] + [base(t) for t in cols] + (["n/a"] if "induction" in tasks else []))
    missing = [label for label, (_, f) in archs.items() if f is None]
    sweep = [[label] + [cell(f"mqar{p}", label) for p in pairs] for label in sized]
    sweep.append(["no-recall baseline"] + [base(f"mqar{p}") for p in pairs])
    tokens = run["max_iters"] * run["batch_size"] * run["block_size"]
    body = (f"Every run: {run['max_iters']} iters x {run['batch_size']} sequences x {run['block_size']} tokens "
            f"({tokens / 1e6:.2f}M tokens), lr {run['lr']}, {run['task_vocab']} symbols; the Transformer's "
            f"d_model x 2 layers sets the active-parameter target and every other model gets the width (and depth) "
            f"nearest it. Accuracy on the answers only, from the last evaluation; 'no-recall baseline' is the rule "
            f"that recalls nothing, scored on the same answers (train.py's SynthData.guess): the most frequent data "
            f"symbol for selective copying and MQAR, a fixed non-key symbol for induction (1 / (16 - 4) with 4 keys "
            f"asked per sequence; induction has 4 scored answers per sequence so that it is learned in this budget). "
            f"A second seed (up to --seeds) runs where the first is neither solved (>= 0.97) nor at its baseline; "
            f"± is half the range over seeds.\n\n" + table(head, rows)
            + f"\n\nMQAR at a fixed width: accuracy against the number of key-value pairs (8 queries per "
              f"sequence). Zoology (Arora et al. 2023): attention solves MQAR at any width, a recurrent model "
              f"needs a state that grows with the number of pairs; Jamba's and Zamba's answer is a little "
              f"attention among the Mamba layers.\n\n" + table(["model"] + [f"{p} pairs" for p in pairs], sweep)
            + (f"\n\nNot run: {', '.join(missing)} (this model_hybrid has no `layers` pattern with a shared "
               f"block S)." if missing else ""))
    series = {label: [(p, mean(acc(f"mqar{p}", label))) for p in pairs] for label in sized}
    series["no-recall baseline"] = [(p, base_of(f"mqar{p}")) for p in pairs]
    picture = svg_lines([dict(title="MQAR at a fixed width", xlabel="key-value pairs", ylabel="answer accuracy",
                              series=series, logx=True)], cols=1, width=520)
    lab.page("Recall: selective copying, induction, MQAR", body, picture)


def moe(lab):
    """dense vs Mixture-of-Experts at equal active parameters and equal tokens; expert load over training"""
    # Character-level tiny Shakespeare (1.0M characters, vocabulary 65): the embedding is a few thousand
    # parameters, so "equal active parameters" is about the blocks, where MoE adds its experts. With GPT-2
    # BPE (50K vocabulary) the tied embedding alone would be 3.2M parameters at d_model 64, dwarfing the
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
    data = data_of(run["dataset"], lab.data_dir)
    vocab, train_tokens = data.vocab_size, len(data.train)
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
            f"model (plus the router) while total parameters grow with the experts. Active parameters count the "
            f"embedding (tied with the output layer). Load statistics are the MoE layers' mean at the last "
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
            f"attention scores, PaLM's convention). N counts every parameter, the embedding included (65 x d_model, "
            f"tied with the output layer). Loss: validation, at the end.\n\n"
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
    "architectures": architectures, "recall": recall, "moe": moe, "scaling": scaling,
}

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
    from train import UsageError, die, read_args, typed  # (moves with the option helpers)
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
