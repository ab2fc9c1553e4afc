"""
The experiments' runner: `Lab` runs train.py over a list of runs (one process each, OMP_NUM_THREADS=1,
--jobs at once), reads their metrics.jsonl into `Run`s and writes the page; then what several
experiments share: spreads over seeds, models sized to a parameter target, the Transformer claims' runs.
"""
import collections
import concurrent.futures
import hashlib
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

import cli
import train
from lab.measure import machine, timed_rounds, train_step
from lab.verdicts import fixed_batches, score_run

REPO = Path(__file__).resolve().parent.parent
DEFAULT_SEEDS = 3


class Lab:
    """What every experiment gets: where to write, how many seeds, the quick switch, and `train`,
    which runs train.py over a list of runs and returns their metrics."""

    def __init__(self, name, opts, folder, first_seed):
        self.name, self.quick, self.seeds, self.jobs = name, opts["quick"], opts["seeds"], opts["jobs"]
        self.out, self.data_dir, self.device = Path(opts["out"]), opts["data_dir"], opts["device"]
        self.runs_dir = self.out / "runs" / folder
        self.first_seed = first_seed
        self.commands = []  # every train.py command line, for the page
        self.reused = []  # runs read from an earlier invocation: their training time is not in this one's wall time
        self.t0 = time.time()

    def seed_values(self, n=None):
        """The seeds of an experiment: n (default --seeds) of them from the experiment's first seed."""
        return range(self.first_seed, self.first_seed + (n or self.seeds))

    def train(self, runs, then=None):
        """runs: [(label, [--name=value, ...])]. Each runs as `python train.py ARGS --out_dir=...`, `jobs` at
        once. `then(label, run)` may return more runs, which start before the ones still waiting (a second
        seed where the first came out close). Returns {label: Run}; a failed run has rc != 0, never dropped."""
        waiting, running, done = collections.deque(runs), {}, {}
        with concurrent.futures.ThreadPoolExecutor(self.jobs) as pool:
            while waiting or running:
                while waiting and len(running) < self.jobs:
                    label, args = waiting.popleft()
                    args = [*args, f"--data_dir={self.data_dir}", f"--out_dir={self.runs_dir / label}",
                            *([f"--device={self.device}"] if self.device != "auto" else [])]
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
        cmd = f"python -m lab.experiments {self.name}" + (" --quick" if self.quick else "") + \
              (f" --seeds={self.seeds}" if self.seeds != DEFAULT_SEEDS else "")
        runs = "\n".join(self.commands)
        how = (f"{self.jobs} run(s) at once with one thread each" if self.commands else
               "no train.py runs: trained and measured by the lab itself")
        text = (f"# {title}\n\n`{cmd}` — {machine()}, {how}, wall time {(time.time() - self.t0) / 60:.1f} min"
                + (f" ({len(self.reused)} of the runs below were read from finished runs with the same arguments and code in "
                   f"{self.runs_dir}, not rerun: their time is not in this wall time)" if self.reused else "") + f".\n\n{body.strip()}\n\n"
                + (f"![{self.name}]({self.name}.svg)\n\n" if picture else "")
                + (f"<details><summary>The {len(self.commands)} training runs</summary>\n\n```\n{runs}\n```\n</details>\n"
                   if self.commands else ""))
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


def code_hash(args):
    """A hash of the files that decide what train.py does with these arguments: the model file it builds,
    kernels.py, train.py, data.py and cli.py (and a preset's text). A finished run is reused only if it was
    trained by this very code."""
    files = [REPO / f for f in ("kernels.py", "train.py", "data.py", "cli.py")]
    files += [REPO / a for a in args if a.endswith(".py")]
    model = dict(cli.read_args([str(REPO / a) if a.endswith(".py") else a for a in args])).get("model", train.OPTIONS["model"][0])
    files.append(Path(cli.MODELS[model].__file__) if model in cli.MODELS else REPO / "train.py")  # a bad name: train.py says so
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.read_bytes())
    return digest.hexdigest()[:16]


def train_once(args, run_dir):
    """One train.py process; reuse a finished run made with exactly these arguments by the same code."""
    stamp = run_dir / "args.json"
    done = json.loads(stamp.read_text()) if stamp.is_file() else {}
    code = code_hash(args)
    if done.get("args") == args and done.get("code") == code and done.get("rc") == 0:
        return Run(run_dir, 0, done.get("seconds", float("nan")), reused=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    stamp.unlink(missing_ok=True)
    # a failed run, or one with other arguments, is replaced: train.py is told so, or it keeps it
    earlier = any((run_dir / name).is_file() for name in ("ckpt_last.pt", "ckpt_best.pt"))
    t0 = time.time()
    with open(run_dir / "log.txt", "w") as log:
        rc = subprocess.run([sys.executable, str(REPO / "train.py"), *args, *(["--overwrite=True"] if earlier else [])],
                            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=REPO).returncode
    seconds = time.time() - t0
    stamp.write_text(json.dumps({"args": args, "code": code, "rc": rc, "seconds": seconds}))
    return Run(run_dir, rc, seconds, reused=False)


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


# ----------------------------------------------------------------------------- the Transformer claims
# ladder, ladder_alone, positions, norms, attention: runs are labelled NAME-sSEED; quick mode is one seed of a
# tiny model for a handful of steps (it checks the code path, not the claim).

# quick mode trains on the built-in corpus (its windows are as good as any for a code-path check), so the test
# suite needs no download
QUICK_SHAPE = ["--dataset=pydoc", "--d_model=32", "--n_layer=1", "--n_head=4", "--block_size=32", "--batch_size=4", "--max_iters=6",
               "--eval_interval=6", "--eval_iters=1", "--warmup_iters=2", "--log_interval=6"]
SHAKESPEARE = ["config/shakespeare_char.py"]
GPT2 = ["config/shakespeare_char.py", "config/gpt2_style.py"]


def seeded(lab, configs):
    """configs: [(key, args)] -> lab.train over every seed; returns {key: [Run per seed]}."""
    seeds = lab.seed_values(1 if lab.quick else None)
    runs = lab.train([(f"{key}-s{s}", [*args, f"--seed={s}", *(QUICK_SHAPE if lab.quick else [])])
                      for key, args in configs for s in seeds])
    return {key: [runs[f"{key}-s{s}"] for s in seeds] for key, _ in configs}


def quick_note(lab):
    return ("\n**Quick mode**: a code-path check on a tiny budget (small data, tiny models, a few steps, one seed): "
            "these numbers say nothing about the claims.\n\n" if lab.quick else "")


def fixed_val_losses(lab, runs, n=50, batch_size=12, block_size=64):
    """({key: [loss of each seed's last checkpoint]}, a phrase saying on what) for seeded()'s runs: every model
    and seed scored on the same n fixed validation batches of the text they trained on (tiny Shakespeare's
    characters; in quick mode the built-in corpus of QUICK_SHAPE); a failed run is nan."""
    dataset = "pydoc" if lab.quick else "shakespeare_char"
    if lab.quick:
        n, batch_size, block_size = 2, 4, 32
    batches = fixed_batches(data_of(dataset, lab.data_dir), n, batch_size, block_size)
    note = (f"the same {n} fixed validation batches ({batch_size} x {block_size} tokens each, "
            f"{n * batch_size * block_size:,} in all) for every model and seed, scored at each run's last checkpoint")
    return {key: [score_run(r, batches)[0] for r in rs] for key, rs in runs.items()}, note


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
    steps = {k: train_step(m, batch_size, m.config.block_size, 65) for k, m in models.items()}
    secs = timed_rounds(steps, rounds=2 if quick else 5, steps=1 if quick else 5, clock=time.process_time)
    return {k: 1000 * s for k, s in secs.items()}


def kv_bytes_per_token(model):
    return model.cache_bytes(model.new_cache(1, max_len=1))  # one position, all layers, float32
