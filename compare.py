"""
The architectures side by side: one training script, the same data, the same number of training
tokens and about the same number of (active) parameters for every model in data.MODELS.

    python compare.py --quick                 # about 10 minutes on 2 CPU cores
    python compare.py                         # the fuller run, meant for a GPU
    python compare.py --quick --models=transformer,mamba --out_dir=cmp

For each dataset (the built-in text and the synthetic tasks selective_copy, induction, mqar) and
each model it runs train.py into OUT/<dataset>/<model>/ (log.txt beside the checkpoints and
metrics.jsonl), then measures decoding at a 4096-token context and writes
  OUT/results.md    the tables (also printed): size, FLOPs, speed, loss, accuracies
  OUT/val_loss.svg  validation loss against training tokens, all models, one panel per dataset

Matched size: the Transformer at the mode's d_model and n_layer sets the target. Every other model
gets the d_model and n_layer from a small grid whose active parameter count (per token: for a
Mixture-of-Experts model, the experts a token is routed to, not all of them) comes closest; among
those within 5% of the target, the one whose width is nearest the Transformer's. Embeddings count,
so the choice is made per dataset (the vocabularies differ). Every model trains with the same
options (learning rate included): nothing is tuned per architecture.
"""
import concurrent.futures
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

import data
import train

DATASETS = ["pydoc", *data.SYNTHETIC]
MODES = {  # the Transformer's size and the shared training budget of every run
    "quick": dict(d_model=64, n_layer=2, block_size=64, batch_size=16, max_iters=1200, eval_interval=100,
                  eval_iters=10, lr=2e-3, min_lr=2e-4, warmup_iters=50, decode_steps=64, jobs=2,
                  model_args="hybrid.layers=Md Me Ad Me"),
    "full": dict(d_model=256, n_layer=4, block_size=256, batch_size=32, max_iters=3000, eval_interval=250,
                 eval_iters=20, lr=1e-3, min_lr=1e-4, warmup_iters=200, decode_steps=128, jobs=1,
                 model_args="hybrid.layers=Md Me Md Me Ad Me Md Me,hybrid.n_expert=16"),  # Jamba's block
}
OPTIONS = {
    "quick": (False, "the small mode (2 CPU cores, ~10 minutes); otherwise the fuller one (a GPU)"),
    "models": (",".join(data.MODELS), "comma-separated models to compare"),
    "datasets": (",".join(DATASETS), "comma-separated datasets (train.py's --dataset)"),
    "out_dir": ("compare", "where the runs, the table and the picture go"),
    "data_dir": ("data", "train.py's --data_dir"),
    "device": ("auto", "train.py's --device; also where decoding is measured"),
    "model_args": ("", "extra Config fields per model, e.g. hybrid.layers=Md Me Ad Me,moe.top_k=1 (added to the mode's)"),
    "max_iters": (0, "training steps of every run (0: the mode's)"),
    "jobs": (0, "training runs at once (0: the mode's choice; on a CPU each gets OMP_NUM_THREADS=cores/jobs unless set)"),
    "context": (4096, "context length at which decoding speed and cache memory are measured"),
    "seed": (1337, "train.py's --seed"),
}
COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]


# ----------------------------------------------------------------------------- sizes


def matched_size(module, fixed, vocab_size, block_size, target, d_ref, n_ref):
    """(d_model, n_layer, active params) of `module` nearest `target` active parameters. `fixed` are
    the model's overrides from --model_args (an n_layer there is kept as it is; a model whose depth
    comes from its layer pattern, the hybrid, keeps its pattern)."""
    found = []
    fields = {f.name for f in dataclasses.fields(module.Config)}
    layers = [fixed["n_layer"]] if "n_layer" in fixed else range(max(1, n_ref // 2), 2 * n_ref + 1)
    for n_layer in layers if "n_layer" in fields else [None]:
        for d_model in range(max(8, d_ref // 4), 2 * d_ref + 1, 4):
            try:
                cfg = module.Config(**{**fixed, "vocab_size": vocab_size, "block_size": block_size, "d_model": d_model,
                                       **({"n_layer": n_layer} if n_layer else {})})
            except ValueError:  # e.g. a width the head count does not divide
                continue
            found.append((d_model, cfg.n_layer, module.Model(cfg).num_params(active=True)))
    if not found:
        raise data.UsageError(f"no d_model in [{d_ref // 4}, {2 * d_ref}] and n_layer in {list(layers)} makes a valid "
                               f"{module.__name__} (see --model_args)")
    close = [f for f in found if abs(f[2] - target) <= 0.05 * target]
    if close:  # the width nearest the reference's, then the depth, then the count
        return min(close, key=lambda f: (abs(f[0] - d_ref), abs(f[1] - n_ref), abs(f[2] - target)))
    return min(found, key=lambda f: abs(f[2] - target))


def model_args(text, models):
    """'hybrid.layers=Md Ae,moe.top_k=1' -> {'hybrid': {'layers': 'Md Ae'}, 'moe': {'top_k': 1}}, typed by
    each model's Config; entries for models that are not registered are skipped."""
    out = {m: {} for m in models}
    for item in filter(None, text.split(",")):
        name, dot, rest = item.partition(".")
        field, eq, value = rest.partition("=")
        if not dot or not eq:
            raise data.UsageError(f"--model_args entries look like model.field=value, got {item!r}")
        if name not in data.MODELS:
            continue
        kinds = {f.name: f.type for f in dataclasses.fields(data.MODELS[name].Config)}
        if field not in kinds:
            raise data.UsageError(f"model_{name}.py Config has no field {field!r}")
        if name in out:
            out[name][field] = data.parse_value(field, value, kinds[field])
    return out


def vocab_of(dataset, opts):
    return (data.SynthData(opts) if dataset in data.SYNTHETIC else data.TextData(opts)).vocab_size


# ----------------------------------------------------------------------------- runs


def train_args(mode, dataset, name, config, run_dir, opts):
    keys = ("block_size", "batch_size", "max_iters", "eval_interval", "eval_iters", "lr", "min_lr", "warmup_iters")
    return ([f"--model={name}", f"--dataset={dataset}", f"--out_dir={run_dir}", f"--data_dir={opts['data_dir']}",
             f"--device={opts['device']}", f"--seed={opts['seed']}", f"--log_interval={mode['eval_interval']}"]
            + [f"--{k}={mode[k]}" for k in keys] + [f"--{k}={v}" for k, v in config.items()])


def run_one(args, run_dir, threads):
    """train.py in its own process: one model failing does not stop the others."""
    run_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    t0 = time.time()
    with open(run_dir / "log.txt", "w") as log:
        rc = subprocess.run([sys.executable, str(Path(__file__).resolve().parent / "train.py"), *args],
                            stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    return rc, time.time() - t0


def read_run(run_dir):
    """The last evaluation of a run, with training tokens/s and any length-extrapolation note."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    evals = [r for r in map(json.loads, path.read_text().splitlines()) if "val_loss" in r]
    if not evals:
        return None
    last = dict(evals[-1])
    last["tok_s"] = last["tokens"] / last["train_time"] if last.get("train_time") else float("nan")
    last["curve"] = [(r["tokens"], r["val_loss"]) for r in evals]
    log = (run_dir / "log.txt").read_text() if (run_dir / "log.txt").is_file() else ""
    last["note"] = next((l.split("(", 1)[-1].rstrip(")") for l in log.splitlines() if "no val_acc_" in l), "")
    return last


@torch.no_grad()
def measure_decode(module, config, vocab_size, context, steps, device):
    """Tokens/s of one-token steps at the end of a `context`-token sequence (from the median step:
    on shared cores a few steps get descheduled), and the bytes the cache holds there. The
    architecture of the trained model with block_size = context (a Transformer's position table or
    KV cache is sized by it); random weights: speed and memory do not depend on their values."""
    torch.manual_seed(0)
    model = module.Model(module.Config(**config, vocab_size=vocab_size, block_size=context)).to(device).eval()
    idx = torch.randint(vocab_size, (1, context), device=device)  # (1, context)
    cache = model.new_cache(1)
    for start in range(0, context - steps, 512):  # chunked prefill: bounded memory for the attention scores
        model(idx[:, start:min(start + 512, context - steps)], cache=cache)
    sync = torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)
    times = []
    for t in range(context - steps, context):
        sync()
        t0 = time.perf_counter()
        model(idx[:, t:t + 1], cache=cache)
        sync()
        times.append(time.perf_counter() - t0)
    return 1 / sorted(times)[len(times) // 2], model.cache_bytes(cache)


# ----------------------------------------------------------------------------- the table and the picture


def fmt(x, spec):
    return "n/a" if x is None or x != x else format(x, spec)


def tables(results, configs, stats, decode, datasets, models, text, context):
    """Markdown: one table of what each model costs, one of what it learned."""
    rows = ["| model | d_model x n_layer | params | active | MFLOPs/token | train tok/s | decode tok/s "
            f"@{context} | cache @{context} |", "|---|---|---|---|---|---|---|---|"]
    for m in models:
        s, r, d = stats[(text, m)], results.get((text, m)), decode.get(m)
        rows.append(f"| {m} | {configs[m]['d_model']} x {s['n_layer']} | {s['params'] / 1e6:.3f}M | {s['active'] / 1e6:.3f}M | "
                    f"{s['flops'] / 1e6:.2f} | {fmt(r and r['tok_s'], ',.0f')} | "
                    f"{fmt(d and d[0], ',.0f')} | {'n/a' if not d else f'{d[1] / 2**20:.2f} MiB'} |")
    head = ["model"] + [f"{ds} val loss" for ds in datasets] + [f"{ds} acc" for ds in datasets if ds in data.SYNTHETIC]
    head += ["induction acc @4x"] if "induction" in datasets else []
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in models:
        cells = [m]
        cells += [fmt((results.get((ds, m)) or {}).get("val_loss"), ".3f") for ds in datasets]
        cells += [fmt((results.get((ds, m)) or {}).get("val_acc"), ".3f") for ds in datasets if ds in data.SYNTHETIC]
        if "induction" in datasets:
            r = results.get(("induction", m)) or {}
            long = next((v for k, v in r.items() if k.startswith("val_acc_")), None)
            cells.append(fmt(long, ".3f") if long is not None else "not run" + (f" ({r['note']})" if r.get("note") else ""))
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows), "\n".join(out)


def svg_curves(results, datasets, models, path):
    """Validation loss against training tokens, one panel per dataset, written by hand (no plotting
    library needed)."""
    W, H, cols = 360, 240, 2
    rows_n = (len(datasets) + cols - 1) // cols
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W * cols}" height="{H * rows_n + 30}" '
             f'font-family="sans-serif" font-size="11">', f'<rect width="100%" height="100%" fill="white"/>']
    for i, m in enumerate(models):  # the legend, across the top
        parts.append(f'<rect x="{10 + 130 * i}" y="8" width="14" height="4" fill="{COLOURS[i % len(COLOURS)]}"/>'
                     f'<text x="{28 + 130 * i}" y="14">{m}</text>')
    for p, ds in enumerate(datasets):
        ox, oy = (p % cols) * W, 30 + (p // cols) * H
        left, top, w, h = ox + 50, oy + 20, W - 70, H - 55
        curves = [(i, (results.get((ds, m)) or {}).get("curve")) for i, m in enumerate(models)]
        pts = [pt for _, c in curves if c for pt in c]
        parts.append(f'<text x="{left + w / 2}" y="{oy + 12}" text-anchor="middle" font-weight="bold">{ds}</text>'
                     f'<rect x="{left}" y="{top}" width="{w}" height="{h}" fill="none" stroke="#888"/>')
        if not pts:
            continue
        x1 = max(t for t, _ in pts) or 1
        y0, y1 = min(v for _, v in pts), max(v for _, v in pts)
        y1 = y1 if y1 > y0 else y0 + 1
        X = lambda t: left + w * t / x1
        Y = lambda v: top + h * (1 - (v - y0) / (y1 - y0))
        for k in range(5):  # ticks: loss on the left, tokens below
            v, t = y0 + (y1 - y0) * k / 4, x1 * k / 4
            parts.append(f'<text x="{left - 4}" y="{Y(v) + 4:.1f}" text-anchor="end">{v:.2f}</text>'
                         f'<text x="{X(t):.1f}" y="{top + h + 14}" text-anchor="middle">{t / 1e6:.2g}M</text>')
        parts.append(f'<text x="{left + w / 2}" y="{top + h + 28}" text-anchor="middle">training tokens '
                     f'(y: validation loss)</text>')
        for i, c in curves:
            if c:
                line = " ".join(f"{X(t):.1f},{Y(v):.1f}" for t, v in c)
                parts.append(f'<polyline points="{line}" fill="none" stroke-width="2" '
                             f'stroke="{COLOURS[i % len(COLOURS)]}"/>')
    parts.append("</svg>")
    path.write_text("\n".join(parts) + "\n")


# ----------------------------------------------------------------------------- main


def main(argv):
    if "-h" in argv or "--help" in argv:
        print(__doc__.strip(), "\n\noptions:")
        for name, (default, text) in OPTIONS.items():
            print(f"  {f'--{name}={default}':<40} {text}")
        return
    try:
        given = data.typed(data.read_args(argv), {k: type(v) for k, (v, _) in OPTIONS.items()}, script="compare.py")
        opts = {k: given.get(k, v) for k, (v, _) in OPTIONS.items()}
        models, datasets = opts["models"].split(","), opts["datasets"].split(",")
        for m in models:
            if m not in data.MODELS:
                raise data.UsageError(f"unknown model {m!r}; choose from {', '.join(data.MODELS)}")
        for ds in datasets:
            if ds not in DATASETS:
                raise data.UsageError(f"unknown dataset {ds!r}; choose from {', '.join(DATASETS)}")
        if opts["jobs"] < 0 or opts["max_iters"] < 0 or opts["context"] <= 0:
            raise data.UsageError("jobs and max_iters must be >= 0, context positive")
    except data.UsageError as e:
        data.die(str(e))
    mode_name = "quick" if opts["quick"] else "full"
    mode = {**MODES[mode_name], **({"max_iters": opts["max_iters"]} if opts["max_iters"] else {})}
    device, _ = data.pick_device({"device": opts["device"], "dtype": "float32"})
    jobs = opts["jobs"] or (mode["jobs"] if device == "cpu" else 1)
    threads = 0  # leave OMP_NUM_THREADS alone: on a GPU, or when the caller set it
    if device == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        threads = max(1, (os.cpu_count() or 1) // jobs)
    out = Path(opts["out_dir"])
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    print(f"compare ({mode_name} mode): {', '.join(models)} on {', '.join(datasets)}; {device}, "
          f"{jobs} run(s) at once, OMP_NUM_THREADS={threads or os.environ.get('OMP_NUM_THREADS', 'unset')}; out {out}")

    # sizes, chosen once on the first dataset and kept for all: the Transformer at the mode's d_model and
    # n_layer sets the target, every other model gets the grid point nearest it
    base = {k: v for k, (v, _) in train.OPTIONS.items()}
    text, T = datasets[0], mode["block_size"]
    ref = "transformer" if "transformer" in data.MODELS else models[0]
    configs, stats = {}, {}
    try:
        extra = model_args(mode["model_args"] + "," + opts["model_args"], [ref, *models])
        vocabs = {ds: vocab_of(ds, {**base, "dataset": ds, "data_dir": opts["data_dir"]}) for ds in datasets}
        ref_module = data.MODELS[ref]
        target = ref_module.Model(ref_module.Config(**{"d_model": mode["d_model"], "n_layer": mode["n_layer"], **extra[ref]},
                                                    vocab_size=vocabs[text], block_size=T)).num_params(active=True)
        for m in models:
            module = data.MODELS[m]
            if m == ref:
                configs[m] = {"d_model": mode["d_model"], "n_layer": mode["n_layer"], **extra[m]}
            else:
                d, n, _ = matched_size(module, extra[m], vocabs[text], T, target, mode["d_model"], mode["n_layer"])
                deep = "n_layer" in {f.name for f in dataclasses.fields(module.Config)}  # not the hybrid's: its pattern
                configs[m] = {**extra[m], "d_model": d, **({"n_layer": n} if deep else {})}
            for ds in datasets:
                model = module.Model(module.Config(**configs[m], vocab_size=vocabs[ds], block_size=T))
                stats[(ds, m)] = dict(params=model.num_params(), active=model.num_params(active=True),
                                      flops=model.flops_per_token(), n_layer=model.config.n_layer)
            st = stats[(text, m)]
            print(f"  {m:12s} {', '.join(f'{k}={v}' for k, v in configs[m].items())}: {st['params']:,} params, "
                  f"{st['active']:,} active ({st['active'] / target - 1:+.1%} vs {ref} on {text})")
    except data.UsageError as e:
        data.die(str(e))

    # training: every (dataset, model) pair, `jobs` at a time
    runs = {(ds, m): out / ds / m for ds in datasets for m in models}
    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        futures = {pool.submit(run_one, train_args(mode, ds, m, configs[m], run_dir, opts), run_dir, threads): (ds, m)
                   for (ds, m), run_dir in runs.items()}
        for f in concurrent.futures.as_completed(futures):
            (ds, m), (rc, secs) = futures[f], f.result()
            status = "ok" if rc == 0 else f"FAILED (exit {rc}, see {runs[(ds, m)] / 'log.txt'})"
            print(f"  trained {m} on {ds} in {secs:.0f}s: {status}", flush=True)
    results = {key: read_run(run_dir) for key, run_dir in runs.items()}

    # decoding at a long context, one model at a time (nothing else of ours running), as many threads as a run had
    if threads:
        torch.set_num_threads(threads)
    decode = {}
    for m in models:
        try:
            decode[m] = measure_decode(data.MODELS[m], configs[m], vocabs[text], opts["context"], mode["decode_steps"],
                                       device)
            print(f"  decode {m} at {opts['context']} tokens: {decode[m][0]:,.0f} tokens/s, "
                  f"cache {decode[m][1] / 2**20:.2f} MiB", flush=True)
        except Exception as e:  # report and carry on: the training results still stand
            print(f"  decode {m} FAILED: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")

    cost, learned = tables(results, configs, stats, decode, datasets, models, text, opts["context"])
    wall = time.time() - t_start
    chance = 1 / base["task_vocab"]
    report = (f"# compare.py --{mode_name}\n\n"
              f"`python compare.py{' --quick' if opts['quick'] else ''}`: {mode_name} mode, device {device}, "
              f"{jobs} training run(s) at once, wall time {wall / 60:.1f} min.\n"
              f"Every run: {mode['max_iters']} iters x {mode['batch_size']} x {mode['block_size']} tokens = "
              f"{mode['max_iters'] * mode['batch_size'] * mode['block_size'] / 1e6:.2f}M training tokens, lr {mode['lr']}. "
              f"Sizes, FLOPs and speeds below are for `{text}`; decoding: batch 1, median of {mode['decode_steps']} steps "
              f"after a {opts['context'] - mode['decode_steps']}-token prefill, float32, random weights, "
              f"{torch.get_num_threads()} thread(s), one model at a time.\n\n"
              f"{cost}\n\nValidation loss (the synthetic tasks: on the answers only) and answer accuracy "
              f"(chance {chance:.3f}; induction also at 4x block_size):\n\n{learned}\n\n"
              f"Validation-loss curves: val_loss.svg\n")
    (out / "results.md").write_text(report)
    svg_curves(results, datasets, models, out / "val_loss.svg")
    print("\n" + report)
    print(f"wrote {out / 'results.md'} and {out / 'val_loss.svg'}")


if __name__ == "__main__":
    main(sys.argv[1:])
