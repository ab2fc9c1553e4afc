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


EXPERIMENTS = {}  # name: function; the first line of its docstring is its --help line

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
