"""
One training script for every model file.

    python train.py                                   # small modern Transformer, built-in corpus
    python train.py config/shakespeare_char.py        # a preset file of overrides
    python train.py --model=transformer --pos=alibi --max_iters=500
    python train.py --init_from=gpt2 --dataset=shakespeare --lr=3e-5  # fine-tune a Hugging Face model
    torchrun --standalone --nproc_per_node=2 train.py # several processes (DDP)
    python train.py --help                            # every option with its default

The script talks to a model only through the interface every model file offers (Config,
Model, forward -> (logits, loss), optim_groups, num_params, flops_per_token, summary, stats): it never
asks which architecture it is training.
"""
import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from html import escape
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import pretrained
from cli import MODELS, UsageError, die, one_line, pick_device, read_args, typed
from data import SYNTHETIC, SynthData, TextData, atomic_write, load_checkpoint, model_from_checkpoint

# name: (default, help). Every name can be set as --name=value or in a preset file; the fields
# of the chosen model's Config (python train.py --help lists them) can be set the same way.
OPTIONS = {
    "model": ("transformer", "model file: " + " | ".join(MODELS)),
    "dataset": ("pydoc", "pydoc (built in) | shakespeare_char | shakespeare | path/to/text.txt | "
                "selective_copy | multi_induction | induction_heads | mqar (synthetic: generated from the seed, "
                "block_size tokens long)"),
    "tokenizer": ("", "char | a tiktoken encoding name (gpt2, ...) | path/to/ranks.tiktoken; '' = dataset's own"),
    "data_dir": ("data", "where datasets are prepared and cached"),
    "out_dir": ("out", "checkpoints (ckpt_last.pt, ckpt_best.pt), metrics.jsonl and loss.svg"),
    "resume": (False, "continue exactly from out_dir/ckpt_last.pt"),
    "init_from": ("", "start from these weights with a new optimizer: a checkpoint of this repository (.pt), or a "
                  "Hugging Face model directory or hub name (gpt2, gpt2-medium, ...) with its tokenizer"),
    "overwrite": (False, "start afresh in an out_dir that already holds a run, replacing it"),
    "batch_size": (12, "sequences per micro-batch (per process)"),
    "grad_accum": (1, "micro-batches per optimizer step"),
    "max_iters": (1000, "optimizer steps"),
    "stop_at": (0, "stop before this step as an interruption would, on max_iters' schedule (0 = never); "
                   "--resume goes on from the last checkpoint"),
    "stop_acc": (0.0, "stop at an evaluation once val_acc >= this ('solved'; 0 = off); max_iters stays the cap and "
                      "the schedule"),
    "patience": (0, "stop once val_acc has not improved for this many evaluations ('flat'; 0 = off)"),
    "lr": (1e-3, "peak learning rate"),
    "min_lr": (1e-4, "learning rate at the end of the cosine decay"),
    "warmup_iters": (100, "linear warmup steps"),
    "weight_decay": (0.1, "AdamW decay on matrices (models mark what must not decay)"),
    "beta1": (0.9, "AdamW beta1"),
    "beta2": (0.99, "AdamW beta2"),
    "grad_clip": (1.0, "clip the gradient norm to this (0 = off)"),
    "eval_interval": (250, "evaluate and checkpoint every this many steps"),
    "eval_iters": (20, "batches per evaluation"),
    "log_interval": (50, "print a training line every this many steps"),
    "seed": (1337, "random seed (the data stream is one for all processes; dropout: each adds its rank)"),
    "device": ("auto", "auto | cpu | cuda | cuda:N | mps"),
    "dtype": ("auto", "auto (bfloat16 where supported, else float32) | float32 | bfloat16"),
    "compile": (False, "torch.compile the model"),
    "task_vocab": (16, "synthetic tasks: how many data symbols (mqar: keys, and as many values)"),
    "copy_tokens": (8, "selective_copy: data tokens scattered in the noise, to be repeated at the end"),
    "mqar_pairs": (8, "mqar: key-value pairs at the start of each sequence"),
    "mqar_queries": (8, "mqar: keys asked again later in the sequence, each to be answered with its value"),
    "multi_induction_queries": (4, "multi_induction: keys hidden in the noise and asked at the end (answers per sequence)"),
    "extrapolate": (4, "multi_induction, induction_heads: also measure accuracy at this many times block_size (0 = off)"),
}
TASK_OPTIONS = ("task_vocab", "copy_tokens", "mqar_pairs", "mqar_queries", "multi_induction_queries", "extrapolate")
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12, "4090": 165e12}


# ----------------------------------------------------------------------------- configuration


def parse_args(argv):
    """-> (training options, model Config overrides, model module)."""
    raw = read_args(argv)
    model = dict(raw).get("model", OPTIONS["model"][0])
    source = dict(raw).get("init_from")
    if source:  # the weights choose the model file
        held = load_checkpoint(source)["model_name"] if source.endswith(".pt") else pretrained.model_name(source)
        if model != held and "model" in dict(raw):
            raise UsageError(f"--model={model}, but {source} holds a {held} model")
        model = held
    if model not in MODELS:
        raise UsageError(f"unknown model {model!r}; choose from {', '.join(MODELS)}")
    module = MODELS[model]
    fields = {f.name: f.type for f in dataclasses.fields(module.Config)}
    given = typed(raw, {**fields, **{k: type(v) for k, (v, _) in OPTIONS.items()}})
    opts = {k: given.get(k, v) for k, (v, _) in OPTIONS.items()}
    opts["model"] = model
    overrides = {k: v for k, v in given.items() if k not in OPTIONS}
    if opts["resume"] and opts["init_from"]:
        raise UsageError("--resume continues out_dir's own run; --init_from starts a new one: give one of them "
                         "(--init_from= clears a preset's)")
    for name in ("batch_size", "grad_accum", "eval_interval", "eval_iters", "log_interval"):
        if opts[name] <= 0:
            raise UsageError(f"{name} must be positive, got {opts[name]}")
    if not (opts["max_iters"] >= 0 and opts["stop_at"] >= 0 and opts["lr"] > 0 and opts["min_lr"] >= 0
            and opts["warmup_iters"] >= 0):  # NaN fails too
        raise UsageError("max_iters, stop_at, min_lr and warmup_iters must be >= 0 and lr > 0")
    if not (0 <= opts["beta1"] < 1 and 0 <= opts["beta2"] < 1 and opts["weight_decay"] >= 0 and opts["grad_clip"] >= 0):
        raise UsageError("beta1 and beta2 must be in [0, 1), weight_decay and grad_clip >= 0")
    if opts["task_vocab"] < 2 or min(opts["copy_tokens"], opts["mqar_pairs"], opts["mqar_queries"],
                                     opts["multi_induction_queries"]) <= 0:
        raise UsageError("task_vocab must be >= 2; copy_tokens, mqar_pairs, mqar_queries and multi_induction_queries "
                         "positive")
    if opts["dataset"] == "multi_induction" and opts["multi_induction_queries"] >= opts["task_vocab"]:
        raise UsageError(f"multi_induction_queries ({opts['multi_induction_queries']}) needs distinct keys and a symbol "
                         f"left for the noise: less than task_vocab ({opts['task_vocab']})")
    if opts["dataset"] == "mqar" and opts["mqar_pairs"] > opts["task_vocab"]:
        raise UsageError(f"mqar_pairs ({opts['mqar_pairs']}) needs as many distinct keys: at most task_vocab "
                         f"({opts['task_vocab']})")
    if opts["resume"] and opts["overwrite"]:
        raise UsageError("--resume continues the run in out_dir, --overwrite replaces it: say one of them")
    if opts["extrapolate"] < 0:
        raise UsageError(f"extrapolate must be >= 0, got {opts['extrapolate']}")
    if not 0 <= opts["stop_acc"] <= 1:  # NaN fails too
        raise UsageError(f"stop_acc must be in [0, 1] (0 = off), got {opts['stop_acc']}")
    if opts["patience"] < 0:
        raise UsageError(f"patience must be >= 0 evaluations (0 = off), got {opts['patience']}")
    return opts, overrides, module


def print_help(argv):
    model = next((a.split("=", 1)[1] for a in argv if a.startswith("--model=")), OPTIONS["model"][0])
    print(__doc__.strip(), "\n\ntraining options:")
    for name, (default, text) in OPTIONS.items():
        print(f"  {f'--{name}={default}':<28} {text}")
    if model in MODELS:
        print(f"\nmodel options ({model}: model_{model}.py Config; vocab_size comes from the tokenizer):")
        for f in dataclasses.fields(MODELS[model].Config):
            print(f"  --{f.name}={f.default}")


# ----------------------------------------------------------------------------- pieces of the loop


def lr_at(it, opts):
    """Linear warmup, then cosine decay from lr to min_lr at max_iters."""
    if it < opts["warmup_iters"]:
        return opts["lr"] * (it + 1) / (opts["warmup_iters"] + 1)
    progress = (it - opts["warmup_iters"]) / max(1, opts["max_iters"] - opts["warmup_iters"])
    return opts["min_lr"] + 0.5 * (1 + math.cos(math.pi * min(1.0, progress))) * (opts["lr"] - opts["min_lr"])


def fmt_time(s):
    return f"{int(s // 3600)}h{int(s % 3600 // 60):02d}m" if s >= 3600 else f"{int(s // 60)}m{int(s % 60):02d}s"


def plot_losses(out_dir, tokens_per_iter):
    """loss.svg: train and val loss against training tokens, as a few lines of hand-written SVG."""
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    series = {"train": [((r["iter"] + 1) * tokens_per_iter, r["loss"]) for r in rows if "loss" in r],
              "val": [(r["tokens"], r["val_loss"]) for r in rows if "val_loss" in r]}
    series = {name: [(x, y) for x, y in s if math.isfinite(y)] for name, s in series.items()}
    pts = [p for s in series.values() for p in s] or [(0, 0)]
    x0, x1, y0, y1 = min(x for x, _ in pts), max(x for x, _ in pts), min(y for _, y in pts), max(y for _, y in pts)
    W, H, m = 560, 360, 40  # picture size, margin
    X = lambda x: m + (W - 2 * m) * (x - x0) / ((x1 - x0) or 1)
    Y = lambda y: H - m - (H - 2 * m) * (y - y0) / ((y1 - y0) or 1)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="11">',
           '<rect width="100%" height="100%" fill="white"/>',
           f'<text x="{m}" y="16">{escape(f"loss: {out_dir}")}: cross-entropy {y0:.3g} to {y1:.3g} (nats/token) '
           f'over {x0:,} to {x1:,} training tokens</text>']
    for i, (name, s) in enumerate(series.items()):
        colour = ("#1f77b4", "#d62728")[i]
        line = " ".join(f"{X(x):.1f},{Y(y):.1f}" for x, y in s)
        out += [f'<polyline points="{line}" fill="none" stroke-width="2" stroke="{colour}"/>',
                f'<text x="{W - m}" y="{m + 16 * i}" text-anchor="end" fill="{colour}">{name}</text>']
    atomic_write(out_dir / "loss.svg", ("\n".join(out + ["</svg>"]) + "\n").encode())


def record(path, row):
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def load_data(opts):
    if opts["dataset"] in SYNTHETIC:
        return SynthData(opts["dataset"], **{k: opts[k] for k in TASK_OPTIONS})
    return TextData(opts["dataset"], opts["data_dir"], opts["tokenizer"])


def new_model(module, overrides, data):
    vocab = overrides.get("vocab_size", data.vocab_size)
    if vocab < data.vocab_size:
        raise UsageError(f"vocab_size {vocab} is smaller than the tokenizer's {data.vocab_size}")
    try:
        cfg = module.Config(**{**overrides, "vocab_size": vocab})
    except ValueError as e:
        raise UsageError(str(e)) from None
    data.check(cfg.block_size)  # before the weights exist: a block_size the data cannot fill fails fast
    return module.Model(cfg)


def initial_weights(opts, overrides):
    """--init_from: (model, its tokenizer spec, the --tokenizer that tokenizes the dataset the same way).
    A checkpoint of this repository keeps its Config; a Hugging Face model's comes from its config.json.
    Only fields that do not change what the model computes may be set (pretrained.FREE): block_size
    for one, to continue at twice the context, which RoPE, ALiBi and no positions allow and a learned
    position table (no rows for the new positions) does not."""
    source = opts["init_from"]
    if not source.endswith(".pt"):
        _, model = pretrained.load_model(source, overrides)
        spec = pretrained.tokenizer_spec(source, opts["data_dir"])
        tok = "gpt2" if spec["kind"] == "bpe" else str(pretrained.find(source) / "tokenizer.json")
        return model, spec, opts["tokenizer"] or tok
    ckpt = load_checkpoint(source)
    bad = sorted(set(overrides) - pretrained.FREE)
    if bad:
        raise UsageError(f"--{bad[0]} would change what {source} computes (free to set: {', '.join(sorted(pretrained.FREE))})")
    module = MODELS[ckpt["model_name"]]
    try:
        model = module.Model(module.Config(**{**ckpt["model_config"], **overrides}))
    except (TypeError, ValueError) as e:
        raise UsageError(f"{source}: {one_line(e)}") from None
    want = model.state_dict()
    for name, t in ckpt["model"].items():
        if name in want and t.shape != want[name].shape:
            raise UsageError(f"{source}: {name} has shape {tuple(t.shape)}, these options need {tuple(want[name].shape)}"
                             f"{' (a learned position table has no rows for the new positions)' if name == 'wpe.weight' else ''}")
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise UsageError(f"{source} does not match model_{ckpt['model_name']}.py: {one_line(e)}") from None
    return model, ckpt["tokenizer"], opts["tokenizer"]


def check_out_dir(out_dir, opts):
    """A fresh run never replaces an earlier one unless told to: repeating a command is common."""
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"out_dir {out_dir} is a file, not a directory")
    held = [p.name for p in (out_dir / "ckpt_last.pt", out_dir / "ckpt_best.pt") if p.is_file()]
    if held and not opts["resume"] and not opts["overwrite"]:
        raise UsageError(f"{out_dir} already holds a run ({', '.join(held)}): continue it with --resume=True, "
                         f"choose another --out_dir, or replace it with --overwrite=True")


def out_of_memory(e):
    return isinstance(e, torch.OutOfMemoryError) or any(
        text in str(e) for text in ("can't allocate memory", "out of memory", "Cannot allocate memory"))


class fits:
    """Running out of memory inside becomes one line that says what did not fit and what to make
    smaller; the checkpoints on disk stay those of the last evaluation. Reusable: a step enters it
    at every iteration."""

    def __init__(self, what, lower):
        self.what, self.lower = what, lower

    def __enter__(self):
        return self

    def __exit__(self, kind, e, tb):
        if isinstance(e, MemoryError) or (isinstance(e, RuntimeError) and out_of_memory(e)):
            raise UsageError(f"out of memory {self.what}: lower {self.lower}") from None
        return False


def checkpoint_to_resume(path, opts, overrides):
    ckpt = load_checkpoint(path)
    if ckpt["model_name"] != opts["model"]:
        raise UsageError(f"{path} holds a {ckpt['model_name']} model, not {opts['model']}")
    missing = {"optimizer", "iter", "best_val", "rng"} - ckpt.keys()
    if missing:
        raise UsageError(f"{path} cannot be resumed (no {', '.join(sorted(missing))}); train afresh without --resume")
    for k, v in overrides.items():
        if ckpt["model_config"].get(k) != v:
            raise UsageError(f"--{k}={v} differs from the checkpoint's {k}={ckpt['model_config'].get(k)}")
    return ckpt


def stretched(module, model, factor, device):
    """The same weights in a model with a factor times longer block_size, to measure length
    extrapolation. (None, why) when they do not fit, e.g. learned positions: that table has no rows
    for the new positions."""
    try:
        long = module.Model(module.Config(**{**dataclasses.asdict(model.config),
                                             "block_size": factor * model.config.block_size}))
        long.load_state_dict(model.state_dict())
    except (ValueError, RuntimeError) as e:
        return None, str(e).strip().splitlines()[-1].strip()
    return long.to(device).eval(), ""


@torch.no_grad()
def measure(model, data, split, T, opts, device, autocast, gen):
    """Mean loss, the share of scored targets (answers; every token of a text) that the likeliest
    prediction gets right, and the share a no-recall rule gets right (synthetic tasks)."""
    losses, right, scored, guessed = [], 0, 0, 0
    for _ in range(opts["eval_iters"]):
        x, y = data.batch(split, opts["batch_size"], T, gen)
        if data.guess:  # the no-recall baseline on the very same answers
            guessed += (data.guess(x)[:, None] == y)[y != -1].sum().item()
        x, y = x.to(device), y.to(device)
        with autocast:
            logits, loss = model(x, y)
        losses.append(loss.item())
        right += (logits.argmax(-1) == y)[y != -1].sum().item()
        scored += (y != -1).sum().item()
    return sum(losses) / len(losses), right / scored, guessed / scored


def evaluate(model, long_model, stretch, data, opts, device, autocast):
    model.eval()
    gen = torch.Generator().manual_seed(opts["seed"] + 999)  # the same batches at every evaluation
    T, out = model.config.block_size, {}
    out["train_loss"], _, _ = measure(model, data, "train", T, opts, device, autocast, gen)
    out["val_loss"], out["val_acc"], baseline = measure(model, data, "val", T, opts, device, autocast, gen)
    if data.guess:
        out["val_baseline"] = baseline
    if long_model is not None:
        long_model.load_state_dict(model.state_dict())
        _, out[f"val_acc_{stretch}x"], _ = measure(long_model, data, "val", stretch * T, opts, device, autocast, gen)
    model.train()
    return out


def rng_states(gen, device, world):
    """Every rank's random state (data stream, dropout): what exact resumption needs."""
    mine = {"data": gen.get_state(), "torch": torch.get_rng_state(),
            **({"cuda": torch.cuda.get_rng_state(device)} if device.startswith("cuda") else {})}
    if world == 1:
        return [mine]
    gathered = [None] * world
    dist.all_gather_object(gathered, mine)  # collective: every rank takes part
    return gathered


def restore(ckpt, optimizer, gen, rank, device):
    rng = ckpt["rng"][rank] if rank < len(ckpt["rng"]) else ckpt["rng"][0]
    try:
        optimizer.load_state_dict(ckpt["optimizer"])
        gen.set_state(rng["data"])
        torch.set_rng_state(rng["torch"])
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        raise UsageError(f"checkpoint's optimizer or random state does not fit this model: {e}".splitlines()[0]) from None
    if device.startswith("cuda") and "cuda" in rng:
        torch.cuda.set_rng_state(rng["cuda"])


# ----------------------------------------------------------------------------- training


def train(opts, overrides, module):
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    ddp, master = world > 1, rank == 0
    log = print if master else (lambda *a, **k: None)
    device, dtype = pick_device(opts["device"], opts["dtype"])
    out_dir = Path(opts["out_dir"])
    check_out_dir(out_dir, opts)
    last_path, best_path, metrics_path = out_dir / "ckpt_last.pt", out_dir / "ckpt_best.pt", out_dir / "metrics.jsonl"
    ckpt = checkpoint_to_resume(last_path, opts, overrides) if opts["resume"] else None
    if ddp:
        if device.startswith("cuda"):
            device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")

    torch.manual_seed(opts["seed"])  # the same initial weights on every rank
    init = initial_weights(opts, overrides) if opts["init_from"] else None
    data = load_data({**opts, "tokenizer": init[2]} if init else opts)
    if ckpt is not None and ckpt["tokenizer"] != data.tokenizer_spec:
        raise UsageError(f"{last_path} was trained with another tokenizer than dataset {opts['dataset']} has")
    if init is not None and init[1] != data.tokenizer_spec:
        raise UsageError(f"{opts['init_from']} has another tokenizer than dataset {opts['dataset']} gets (--tokenizer as it was trained)")
    smaller = "the model's size (--d_model, --n_layer, --d_ff; --n_expert for MoE)"
    with fits(f"building the {opts['model']} model on {device}", smaller):
        model = model_from_checkpoint(ckpt)[0] if ckpt is not None else init[0] if init else new_model(module, overrides, data)
        cfg = model.config
        data.check(cfg.block_size)
        raw_model = model.to(device)
        stretch = data.extrapolate if master else 0
        long_model, why = stretched(module, raw_model, stretch, device) if stretch else (None, "")
        optimizer = torch.optim.AdamW(model.optim_groups(opts["weight_decay"]), lr=opts["lr"],
                                      betas=(opts["beta1"], opts["beta2"]))
    batch = f"{opts['batch_size']} x {cfg.block_size} tokens per batch on {device}"
    fits_step = fits(f"in a training step ({batch})", f"--batch_size (--grad_accum keeps the tokens per step), "
                                                      f"--block_size or {smaller}")
    fits_eval = fits(f"evaluating ({batch}{f', and {stretch}x longer ones' if long_model else ''})",
                     "--batch_size or --block_size"
                     + (" or set --extrapolate=0" if long_model else ""))
    gen = torch.Generator().manual_seed(opts["seed"])  # the data stream, one for all ranks (each keeps its share)
    torch.manual_seed(opts["seed"] + rank)  # dropout
    start_iter, best_val = (ckpt["iter"], ckpt["best_val"]) if ckpt is not None else (0, float("inf"))
    # --stop_acc and --patience: the best val_acc so far, the evaluations since it last rose and why the run stopped
    # travel in the checkpoint, so a resumed run stops where an uninterrupted one does
    best_acc, since_best, stopped = (ckpt.get("best_acc", -1.0), ckpt.get("since_best", 0), ckpt.get("stopped")) \
        if ckpt is not None else (-1.0, 0, None)
    if ckpt is not None:
        restore(ckpt, optimizer, gen, rank, device)
    if opts["compile"]:
        model = torch.compile(model)
    if ddp:
        model = DistributedDataParallel(model, device_ids=[int(device.split(":")[1])] if device.startswith("cuda") else None)
    autocast = (torch.autocast(device.split(":")[0], dtype=torch.bfloat16) if dtype == "bfloat16"
                else contextlib.nullcontext())

    tokens_per_iter = opts["batch_size"] * cfg.block_size * opts["grad_accum"] * world
    n_params, n_active, flops = raw_model.num_params(), raw_model.num_params(active=True), raw_model.flops_per_token()
    total = tokens_per_iter * opts["max_iters"]
    log(f"model {opts['model']}: {n_params / 1e6:.2f}M parameters ({n_active / 1e6:.2f}M active), "
        f"{flops / 1e6:.1f} MFLOPs per token (training)")
    log(f"architecture: {raw_model.summary()}")
    log(f"data {data.describe}")
    log(f"plan: {opts['max_iters']} iters x {tokens_per_iter:,} tokens = {total / 1e6:.2f}M tokens = "
        f"{total / n_active:.1f} tokens per parameter (Chinchilla-optimal: ~20)")
    if why:
        log(f"length extrapolation: no val_acc_{stretch}x, the weights do not fit a {stretch}x longer block_size ({why})")
    log(f"device {device}, {dtype}, {world} process{'es' if world > 1 else ''}")
    peak = next((v for k, v in PEAK_FLOPS.items() if device.startswith("cuda") and k in torch.cuda.get_device_name(device)), None)
    if master:
        out_dir.mkdir(parents=True, exist_ok=True)
        kept = []
        if ckpt is not None and metrics_path.is_file():  # drop what the interrupted run logged after its checkpoint
            rows = [l for l in metrics_path.read_text().splitlines() if l.endswith("}")]  # not a line cut by a kill
            kept = [l for l in rows if json.loads(l)["iter"] < start_iter or (json.loads(l)["iter"] == start_iter and "val_loss" in l)]
        metrics_path.write_text("".join(l + "\n" for l in kept))

    model.train()
    t_start = t_last = time.time()
    train_time = 0.0  # seconds in training steps alone (no evaluation, no checkpoints): for tokens/s
    for it in range(start_iter, opts["max_iters"] + 1):
        if stopped:  # resumed from the checkpoint of a run that had already stopped
            log(f"{last_path} is of a run that stopped at iter {it} ({stopped}): nothing to continue")
            break
        if it == opts["stop_at"] and it > start_iter:
            break
        # evaluate and checkpoint (not where we resume: the checkpoint we resume from was made there)
        if (it % opts["eval_interval"] == 0 or it == opts["max_iters"]) and not (ckpt is not None and it == start_iter):
            if master:
                with fits_eval:
                    ev = {**evaluate(raw_model, long_model, stretch, data, opts, device, autocast), **raw_model.stats()}
                extra = "".join(f" | {name} {v:.3g}" for name, v in ev.items() if "loss" not in name)
                log(f"eval {it} | train {ev['train_loss']:.4f} | val {ev['val_loss']:.4f}{extra}")
                best_acc, since_best = (ev["val_acc"], 0) if ev["val_acc"] > best_acc else (best_acc, since_best + 1)
                stopped = ("solved" if opts["stop_acc"] and ev["val_acc"] >= opts["stop_acc"] else
                           "flat" if opts["patience"] and since_best >= opts["patience"] else
                           "max_iters" if it == opts["max_iters"] else None)
                record(metrics_path, {"iter": it, **ev, "tokens": it * tokens_per_iter, "time": time.time() - t_start,
                                      "train_time": train_time, **({"stopped": stopped} if stopped else {})})
                plot_losses(out_dir, tokens_per_iter)
                improved, best_val = ev["val_loss"] < best_val, min(best_val, ev["val_loss"])
            if ddp:  # only rank 0 evaluates: every rank stops with it
                box = [stopped]
                dist.broadcast_object_list(box, src=0)
                stopped = box[0]
            rngs = rng_states(gen, device, world)
            if master:
                state = {"model": raw_model.state_dict(), "model_name": opts["model"], "model_config": dataclasses.asdict(cfg),
                         "tokenizer": data.tokenizer_spec, "optimizer": optimizer.state_dict(), "iter": it,
                         "best_val": best_val, "best_acc": best_acc, "since_best": since_best,
                         "stopped": stopped if stopped != "max_iters" else None,  # a longer --max_iters may go on
                         "rng": rngs, "options": opts}
                atomic_write(last_path, state)
                if improved:
                    atomic_write(best_path, state)
        if stopped:
            if stopped != "max_iters":
                log(f"stopped at iter {it}: " + (f"val_acc {best_acc:.4f} >= stop_acc {opts['stop_acc']}" if stopped == "solved"
                                                 else f"val_acc has not risen above {best_acc:.4f} for {since_best} evaluations"))
            break
        if it == opts["max_iters"]:
            break

        # one optimizer step over grad_accum micro-batches
        t_step = time.time()
        lr = lr_at(it, opts)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_sum, parts = torch.zeros((), device=device), {}
        for micro in range(opts["grad_accum"]):
            sync = not ddp or micro == opts["grad_accum"] - 1  # DDP: all-reduce only on the last micro-batch
            with fits_step, model.no_sync() if not sync else contextlib.nullcontext():
                # every rank draws the micro-batches of all ranks and keeps its own: n processes train on the
                # batches one process would with n times the grad_accum
                x, y = [data.batch("train", opts["batch_size"], cfg.block_size, gen) for _ in range(world)][rank]
                with autocast:
                    _, loss = model(x.to(device), y.to(device))
                (loss / opts["grad_accum"]).backward()
            loss_sum += loss.detach() / opts["grad_accum"]
            for name, part in raw_model.aux.items():  # the parts of the loss (cross-entropy, MoE's auxiliary losses)
                parts[name] = parts.get(name, 0) + part / opts["grad_accum"]
        if ddp:  # every rank sees the same mean loss, and so stops together; its logged parts are means too
            means = torch.stack([loss_sum, *parts.values()]).detach()
            dist.all_reduce(means)
            loss_sum, parts = means[0] / world, dict(zip(parts, means[1:] / world))
        loss_val = loss_sum.item()
        if not math.isfinite(loss_val):
            die(f"loss is {loss_val} at iter {it}; stopping. {last_path} still holds the last good state "
                f"(try a lower --lr or --grad_clip)", code=1)
        # the norm before clipping (spikes warn of instability); grad_clip=0 measures without clipping
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), opts["grad_clip"] or math.inf).item()
        with fits_step:  # the first step also allocates the optimizer's state
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        train_time += time.time() - t_step
        if master:
            record(metrics_path, {"iter": it, "loss": loss_val, **{f"{k}_loss": v.item() for k, v in parts.items()},
                                  "lr": lr, "grad_norm": grad_norm})
        if (it + 1) % opts["log_interval"] == 0 or it == start_iter:
            now = time.time()
            dt = (now - t_last) / (opts["log_interval"] if it != start_iter else 1)
            t_last = now
            mfu = f" | mfu {flops * tokens_per_iter / dt / peak / world:.1%}" if peak else ""
            log(f"iter {it + 1} | loss {loss_val:.4f} | grad_norm {grad_norm:.3f} | lr {lr:.2e} | {dt * 1000:.1f} ms/iter | "
                f"{tokens_per_iter / dt:,.0f} tok/s{mfu} | eta {fmt_time(dt * (opts['max_iters'] - it - 1))}")
    log(f"done{f' ({stopped} at iter {it})' if stopped not in (None, 'max_iters') else ''}: best val loss {best_val:.4f}, "
        f"{fmt_time(time.time() - t_start)}; checkpoints in {out_dir}")
    if ddp:
        dist.destroy_process_group()
        # Gloo frees a finished collective's tensors on its own worker thread, a moment after the
        # waiting rank has moved on, and destroy_process_group does not stop that thread (DDP still
        # holds the group). If the rank is already shutting Python down by then, the thread cannot
        # take the GIL to drop the tensors' Python objects and the process aborts ("terminate
        # called without an active exception", seen on rank 1, which leaves right after the last
        # all_gather_object while rank 0 writes the checkpoint; a barrier only moves the race to
        # the barrier's own cleanup). Everything is written and closed here, so end the process
        # without the interpreter's teardown.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def main(argv):
    if "-h" in argv or "--help" in argv:
        print_help(argv)
        return
    try:
        opts, overrides, module = parse_args(argv)
        train(opts, overrides, module)
    except UsageError as e:
        die(str(e))


if __name__ == "__main__":
    main(sys.argv[1:])
