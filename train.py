"""
One training script for every model file.

    python train.py                                   # small modern Transformer, built-in corpus
    python train.py config/shakespeare_char.py        # a preset file of overrides
    python train.py --model=transformer --pos=alibi --max_iters=500
    torchrun --standalone --nproc_per_node=2 train.py # several processes (DDP)
    python train.py --help                            # every option with its default

The script talks to a model only through the interface every model file offers (Config,
Model, forward -> (logits, loss), optim_groups, num_params, flops_per_token, summary, stats): it never
asks which architecture it is training.
"""
import base64
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import torch

import model_hybrid
import model_mamba
import model_moe
import model_transformer

MODELS = {"transformer": model_transformer, "moe": model_moe, "mamba": model_mamba, "hybrid": model_hybrid}

# name: (default, help). Every name can be set as --name=value or in a preset file; the fields
# of the chosen model's Config (python train.py --help lists them) can be set the same way.
OPTIONS = {
    "model": ("transformer", "model file: " + " | ".join(MODELS)),
    "dataset": ("pydoc", "pydoc (built in) | shakespeare_char | shakespeare | path/to/text.txt | "
                "selective_copy | induction | mqar (synthetic: generated from the seed, block_size tokens long)"),
    "tokenizer": ("", "char | a tiktoken encoding name (gpt2, ...) | path/to/ranks.tiktoken; '' = dataset's own"),
    "data_dir": ("data", "where datasets are prepared and cached"),
    "out_dir": ("out", "checkpoints (ckpt_last.pt, ckpt_best.pt) and metrics.jsonl"),
    "resume": (False, "continue exactly from out_dir/ckpt_last.pt"),
    "batch_size": (12, "sequences per micro-batch (per process)"),
    "grad_accum": (1, "micro-batches per optimizer step"),
    "max_iters": (2000, "optimizer steps"),
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
    "seed": (1337, "random seed (each process adds its rank)"),
    "device": ("auto", "auto | cpu | cuda | cuda:N | mps"),
    "dtype": ("auto", "auto (bfloat16 where supported, else float32) | float32 | bfloat16"),
    "compile": (False, "torch.compile the model"),
    "task_vocab": (16, "synthetic tasks: how many data symbols (mqar: keys, and as many values)"),
    "copy_tokens": (8, "selective_copy: data tokens scattered in the noise, to be repeated at the end"),
    "mqar_pairs": (8, "mqar: key-value pairs at the start of each sequence"),
    "mqar_queries": (8, "mqar: keys asked again later in the sequence, each to be answered with its value"),
    "extrapolate": (4, "induction: also measure accuracy at this many times block_size (0 = off)"),
}
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12, "4090": 165e12}
SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"


class UsageError(Exception):
    """Bad input from the user: reported as one line, exit code 2."""


def die(msg, code=2):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(code)


# ----------------------------------------------------------------------------- configuration


def parse_value(name, text, kind):
    """'--n_layer=4' -> 4, checked against the type of the default."""
    if kind is bool:
        if text.lower() in ("1", "true", "yes"):
            return True
        if text.lower() in ("0", "false", "no"):
            return False
    else:
        try:
            return kind(text)
        except ValueError:
            pass
    raise UsageError(f"--{name} expects {kind.__name__}, got {text!r}")


def read_args(argv):
    """Presets (*.py files of assignments) and --name=value overrides, in order: [(name, value)].
    Values from the command line are still text; values from presets are python objects."""
    raw = []
    for arg in argv:
        if arg.endswith(".py") and not arg.startswith("--"):
            if not os.path.isfile(arg):
                raise UsageError(f"no preset file {arg}")
            ns = {}
            exec(Path(arg).read_text(), {}, ns)  # a preset is trusted python, like nanoGPT's configurator
            raw += [(k, v) for k, v in ns.items() if not k.startswith("_")]
        elif arg.startswith("--"):
            name, eq, value = arg[2:].partition("=")
            raw.append((name, value if eq else "true"))  # a bare --flag is true
        else:
            raise UsageError(f"unexpected argument {arg!r} (options look like --name=value)")
    return raw


def typed(raw, kinds, script="train.py"):
    """Check every name against `kinds` {name: type} and convert command-line text to that type."""
    out = {}
    for name, value in raw:
        if name not in kinds:
            raise UsageError(f"unknown option --{name} (python {script} --help lists them)")
        kind = kinds[name]
        if isinstance(value, str) and kind is not str:
            value = parse_value(name, value, kind)
        elif not isinstance(value, kind) and not (kind is float and isinstance(value, int)):
            raise UsageError(f"{name} expects {kind.__name__}, got {value!r}")
        out[name] = kind(value)
    return out


def parse_args(argv):
    """-> (training options, model Config overrides, model module)."""
    raw = read_args(argv)
    model = dict(raw).get("model", OPTIONS["model"][0])
    if model not in MODELS:
        raise UsageError(f"unknown model {model!r}; choose from {', '.join(MODELS)}")
    module = MODELS[model]
    fields = {f.name: f.type for f in dataclasses.fields(module.Config)}
    given = typed(raw, {**fields, **{k: type(v) for k, (v, _) in OPTIONS.items()}})
    opts = {k: given.get(k, v) for k, (v, _) in OPTIONS.items()}
    overrides = {k: v for k, v in given.items() if k not in OPTIONS}
    for name in ("batch_size", "grad_accum", "eval_interval", "eval_iters", "log_interval"):
        if opts[name] <= 0:
            raise UsageError(f"{name} must be positive, got {opts[name]}")
    if opts["max_iters"] < 0 or opts["lr"] <= 0 or opts["min_lr"] < 0 or opts["warmup_iters"] < 0:
        raise UsageError("max_iters, min_lr and warmup_iters must be >= 0 and lr > 0")
    if opts["task_vocab"] < 2 or min(opts["copy_tokens"], opts["mqar_pairs"], opts["mqar_queries"]) <= 0:
        raise UsageError("task_vocab must be >= 2; copy_tokens, mqar_pairs and mqar_queries positive")
    if opts["dataset"] == "mqar" and opts["mqar_pairs"] > opts["task_vocab"]:
        raise UsageError(f"mqar_pairs ({opts['mqar_pairs']}) needs as many distinct keys: at most task_vocab "
                         f"({opts['task_vocab']})")
    if opts["extrapolate"] < 0:
        raise UsageError(f"extrapolate must be >= 0, got {opts['extrapolate']}")
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


# ----------------------------------------------------------------------------- tokenizers


class Tokenizer:
    """Characters, words (the synthetic tasks: one token per space-separated word) or byte-pair
    encoding (tiktoken). `spec` is plain data (strings, ints), which is what travels inside the
    dataset cache and the checkpoint: sample.py needs nothing else."""

    def __init__(self, spec):
        self.spec = spec
        if spec["kind"] == "words":
            self.words = spec["words"]
            self.stoi = {w: i for i, w in enumerate(self.words)}
            self.vocab_size = len(self.words)
        elif spec["kind"] == "char":
            self.chars = spec["chars"]
            self.stoi = {c: i for i, c in enumerate(self.chars)}
            self.vocab_size = len(self.chars)
        else:
            import tiktoken
            ranks = {base64.b64decode(tok): int(rank) for tok, rank in
                     (line.split() for line in spec["ranks"].splitlines() if line)}
            self.enc = tiktoken.Encoding(spec["name"], pat_str=spec["pat_str"], mergeable_ranks=ranks,
                                         special_tokens=spec["special"])
            self.vocab_size = self.enc.n_vocab

    def encode(self, text):
        if self.spec["kind"] == "words":
            missing = sorted(set(text.split()) - self.stoi.keys())
            if missing:
                raise UsageError(f"text has words outside the vocabulary: {' '.join(missing)!r}")
            return [self.stoi[w] for w in text.split()]
        if self.spec["kind"] == "char":
            missing = sorted(set(text) - self.stoi.keys())
            if missing:
                raise UsageError(f"text has characters outside the vocabulary: {''.join(missing)!r}")
            return [self.stoi[c] for c in text]
        return self.enc.encode_ordinary(text)

    def decode_bytes(self, ids):
        if self.spec["kind"] == "words":
            return "".join(" " + self.words[i] for i in ids).encode()
        if self.spec["kind"] == "char":
            return "".join(self.chars[i] for i in ids).encode()
        return self.enc.decode_bytes(ids)

    def decode(self, ids):
        return self.decode_bytes(ids).decode("utf-8", errors="replace")


def bpe_spec(name_or_path, data_dir):
    """A tiktoken encoding as plain data. Named encodings come from tiktoken (which downloads and
    caches them), or from data_dir/NAME.tiktoken when that file is there; a path to a .tiktoken
    ranks file is split with GPT-2's pattern and gets <|endoftext|> after the last rank."""
    import tiktoken
    local = Path(name_or_path) if name_or_path.endswith(".tiktoken") else Path(data_dir) / f"{name_or_path}.tiktoken"
    if local.is_file():
        from tiktoken_ext.openai_public import r50k_pat_str
        text = local.read_text()
        n = sum(1 for line in text.splitlines() if line)
        return {"kind": "bpe", "name": local.stem, "pat_str": r50k_pat_str, "ranks": text,
                "special": {"<|endoftext|>": n}}
    if name_or_path.endswith(".tiktoken"):
        raise UsageError(f"no tiktoken ranks file at {name_or_path}")
    if name_or_path not in tiktoken.list_encoding_names():
        raise UsageError(f"unknown tokenizer {name_or_path!r}: use char, a tiktoken encoding "
                         f"({', '.join(tiktoken.list_encoding_names())}) or a .tiktoken file")
    try:
        enc = tiktoken.get_encoding(name_or_path)
    except Exception as e:  # no network, most likely
        raise UsageError(f"could not load tiktoken encoding {name_or_path!r} ({type(e).__name__}); "
                         f"without a network, put its ranks file at {local}") from None
    ranks = "".join(f"{base64.b64encode(tok).decode()} {rank}\n" for tok, rank in enc._mergeable_ranks.items())
    return {"kind": "bpe", "name": name_or_path, "pat_str": enc._pat_str, "ranks": ranks,
            "special": dict(enc._special_tokens)}


# ----------------------------------------------------------------------------- datasets


def builtin_text():
    """The help() topics that ship with CPython (pydoc_data): ~0.47M characters of English prose
    about Python with code in it. Always there, so the first run needs no download."""
    from pydoc_data.topics import topics
    return "\n\n".join(topics[k] for k in sorted(topics))


def shakespeare_text(data_dir):
    path = Path(data_dir) / "tinyshakespeare.txt"
    if not path.is_file():
        try:
            with urllib.request.urlopen(SHAKESPEARE_URL, timeout=30) as r:
                text = r.read().decode("utf-8")
        except Exception as e:
            raise UsageError(f"could not download tiny Shakespeare ({type(e).__name__}); without a network, "
                             f"save {SHAKESPEARE_URL} as {path}") from None
        atomic_write(path, text.encode())
    return path.read_text()


def atomic_write(path, data):
    """Write to a temporary file beside `path`, then rename over it: a crash leaves the old file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        if isinstance(data, bytes):
            f.write(data)
        else:
            torch.save(data, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def prepare_text(opts):
    """Tokenize a corpus once and cache train/val token files under data_dir. Returns
    (train tokens, val tokens, tokenizer spec). The split is the first 90% / last 10%."""
    name, data_dir = opts["dataset"], Path(opts["data_dir"])
    if name in ("pydoc", "shakespeare_char", "shakespeare"):
        default_tok = "gpt2" if name == "shakespeare" else "char"
        load = builtin_text if name == "pydoc" else lambda: shakespeare_text(data_dir)
        key = f"{name}" if not opts["tokenizer"] else f"{name}-{Path(opts['tokenizer']).stem}"
    elif os.path.isfile(name):
        default_tok, load = "char", lambda: Path(name).read_text()
        digest = hashlib.sha1(Path(name).read_bytes()).hexdigest()[:10]
        key = f"{Path(name).stem}-{Path(opts['tokenizer'] or 'char').stem}-{digest}"
    else:
        raise UsageError(f"unknown dataset {name!r}: pydoc, shakespeare_char, shakespeare or a path to a text file")
    tok_name = opts["tokenizer"] or default_tok
    cache = data_dir / key
    if (cache / "meta.json").is_file():
        meta = json.loads((cache / "meta.json").read_text())
    else:
        text = load()
        spec = {"kind": "char", "chars": "".join(sorted(set(text)))} if tok_name == "char" else bpe_spec(tok_name, data_dir)
        ids = Tokenizer(spec).encode(text)
        dtype = np.uint16 if max(ids) < 2**16 else np.uint32
        ids = np.array(ids, dtype=dtype)
        n = int(0.9 * len(ids))
        atomic_write(cache / "train.bin", ids[:n].tobytes())
        atomic_write(cache / "val.bin", ids[n:].tobytes())
        meta = {"tokenizer": spec, "dtype": np.dtype(dtype).name, "text_chars": len(text)}
        atomic_write(cache / "meta.json", json.dumps(meta).encode())  # last: marks the cache complete
    read = lambda split: torch.from_numpy(np.fromfile(cache / f"{split}.bin", dtype=meta["dtype"]).astype(np.int64))
    return read("train"), read("val"), meta["tokenizer"]


class TextData:
    """Random windows of a token stream: x is tokens[i:i+T], y is tokens[i+1:i+T+1]."""
    extrapolate = 0  # no evaluation at longer lengths

    def __init__(self, opts):
        self.train, self.val, self.tokenizer_spec = prepare_text(opts)
        self.vocab_size = Tokenizer(self.tokenizer_spec).vocab_size
        self.describe = (f"{opts['dataset']} ({self.tokenizer_spec['kind']}, vocab {self.vocab_size}): "
                         f"{len(self.train):,} train / {len(self.val):,} val tokens")

    def check(self, block_size):
        if block_size + 1 > len(self.val):
            raise UsageError(f"block_size {block_size} is longer than the validation split ({len(self.val)} tokens)")

    def batch(self, split, batch_size, block_size, gen):
        data = self.train if split == "train" else self.val
        start = torch.randint(len(data) - block_size, (batch_size,), generator=gen)  # (B,)
        window = data[start[:, None] + torch.arange(block_size + 1)]  # (B, T+1)
        return window[:, :-1], window[:, 1:]


SYNTHETIC = ("selective_copy", "induction", "mqar")
VAL_SEED = 2**40  # validation batches come from generators seeded from here up; training uses --seed + rank


class SynthData:
    """Synthetic recall tasks, generated on the fly from the random generator it is given: no files,
    no network. A sequence is block_size + 1 tokens; x is all but the last, y all but the first, and
    y is -1 (ignored by the loss and the accuracy) except where the next token is an answer.

    selective_copy  copy_tokens data symbols at random places in a run of noise '.', then '>' and
                    the same symbols in order (the Mamba paper's selective copying, section 4.1.1):
                        . 3 . . 7 . . . 1 . > 3 7 1                      answers: 3 7 1
    induction       random symbols in which a key appears once, followed by some value; at the end
                    '!' and the key again: the answer is that value (induction heads, Olsson et al.
                    2022; the H3 paper's associative recall). Also scored at extrapolate x block_size.
                        4 2 8 5 9 0 3 ... 6 ! 8 5                        answer: 5
    mqar            mqar_pairs key-value pairs, then noise in which mqar_queries keys are asked
                    again, each followed by its value (multi-query associative recall, Zoology,
                    Arora et al. 2023): k3 v1 k0 v7 k5 v2 . . k0 v7 . . k3 v1 . answers: v7 v1
    Chance accuracy is 1 / task_vocab for all three."""

    def __init__(self, opts):
        self.task, V = opts["dataset"], opts["task_vocab"]
        self.opts = opts
        symbols = [str(i) for i in range(V)]
        words = {"selective_copy": [".", ">"] + symbols, "induction": ["!"] + symbols,
                 "mqar": ["."] + [f"k{i}" for i in range(V)] + [f"v{i}" for i in range(V)]}[self.task]
        self.tokenizer_spec = {"kind": "words", "words": words}
        self.vocab_size = len(words)
        self.extrapolate = opts["extrapolate"] if self.task == "induction" else 0
        self.describe = (f"{self.task} (synthetic, words, vocab {self.vocab_size}): generated from the seed, "
                         f"scored on the answers only; chance accuracy {1 / V:.3f}")

    def check(self, block_size):
        o = self.opts
        need = {"selective_copy": (2 * o["copy_tokens"], "2 * copy_tokens"), "induction": (4, "4"),
                "mqar": (2 * o["mqar_pairs"] + 2 * o["mqar_queries"] - 1, "2 * (mqar_pairs + mqar_queries) - 1")}
        least, formula = need[self.task]
        if block_size < least:
            raise UsageError(f"{self.task} needs block_size >= {formula} = {least}, got {block_size}")

    def batch(self, split, batch_size, block_size, gen):
        if split == "val":  # a generator of its own, seeded apart from the training stream
            gen = torch.Generator().manual_seed(VAL_SEED + int(torch.randint(2**31, (), generator=gen)))
        B, L, V, o = batch_size, block_size + 1, self.opts["task_vocab"], self.opts
        seq = torch.zeros(B, L, dtype=torch.long)  # (B, L): token 0 is the noise '.' (induction: '!')
        answer = torch.zeros(B, L, dtype=torch.bool)  # (B, L): which tokens are answers
        if self.task == "selective_copy":  # symbols are tokens 2 .. V+1
            n = o["copy_tokens"]
            body = L - 1 - n
            data = 2 + torch.randint(V, (B, n), generator=gen)  # (B, n)
            where = torch.rand(B, body, generator=gen).argsort(dim=1)[:, :n].sort(dim=1).values  # (B, n) distinct, in order
            seq[:, :body].scatter_(1, where, data)
            seq[:, body] = 1  # '>': now repeat them
            seq[:, body + 1:] = data
            answer[:, body + 1:] = True
        elif self.task == "induction":  # symbols are tokens 1 .. V
            body = L - 3
            key = torch.randint(V, (B, 1), generator=gen)  # (B, 1)
            value = (key + torch.randint(1, V, (B, 1), generator=gen)) % V  # (B, 1), never the key itself
            filler = torch.randint(V - 1, (B, body), generator=gen)  # (B, body)
            filler += filler >= key  # uniform over the other symbols: the key occurs only where we put it
            where = torch.randint(body - 1, (B, 1), generator=gen)  # (B, 1)
            filler.scatter_(1, where, key).scatter_(1, where + 1, value)
            seq[:, :body] = 1 + filler
            seq[:, body + 1], seq[:, body + 2] = 1 + key[:, 0], 1 + value[:, 0]  # '!' (token 0) at body
            answer[:, -1] = True
        else:  # mqar: keys are tokens 1 .. V, values V+1 .. 2V
            P, Q = o["mqar_pairs"], o["mqar_queries"]
            keys = 1 + torch.rand(B, V, generator=gen).argsort(dim=1)[:, :P]  # (B, P) distinct
            values = 1 + V + torch.randint(V, (B, P), generator=gen)  # (B, P)
            seq[:, 0:2 * P:2], seq[:, 1:2 * P:2] = keys, values
            asked = torch.randint(P, (B, Q), generator=gen)  # (B, Q): which pair each query asks for
            where = 2 * P + 2 * torch.rand(B, (L - 2 * P) // 2, generator=gen).argsort(dim=1)[:, :Q]  # (B, Q)
            seq.scatter_(1, where, keys.gather(1, asked)).scatter_(1, where + 1, values.gather(1, asked))
            answer.scatter_(1, where + 1, True)
        return seq[:, :-1], seq[:, 1:].masked_fill(~answer[:, 1:], -1)  # (B, T) each


def stretched(module, model, factor):
    """The same weights in a model with a factor times longer block_size, to measure length
    extrapolation. (None, why) when they do not fit, e.g. learned positions: that table has no rows
    for the new positions."""
    try:
        long = module.Model(module.Config(**{**dataclasses.asdict(model.config),
                                             "block_size": factor * model.config.block_size}))
        long.load_state_dict(model.state_dict())
    except (ValueError, RuntimeError) as e:
        return None, str(e).strip().splitlines()[-1].strip()
    return long, ""


# ----------------------------------------------------------------------------- checkpoints


def load_checkpoint(path):
    """weights_only=True: a checkpoint holds tensors and plain data, so loading one cannot run code."""
    if not os.path.isfile(path):
        raise UsageError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UsageError(f"{path} is not a readable checkpoint (truncated or corrupt?): {type(e).__name__}") from None
    missing = {"model", "model_name", "model_config", "tokenizer"} - set(ckpt if isinstance(ckpt, dict) else {})
    if missing:
        raise UsageError(f"{path} is not a checkpoint of this project (missing {', '.join(sorted(missing))})")
    if ckpt["model_name"] not in MODELS:
        raise UsageError(f"{path} holds a {ckpt['model_name']!r} model, which this version does not have")
    return ckpt


def model_from_checkpoint(ckpt):
    module = MODELS[ckpt["model_name"]]
    try:
        model = module.Model(module.Config(**ckpt["model_config"]))
        model.load_state_dict(ckpt["model"])
    except (TypeError, ValueError, RuntimeError) as e:
        raise UsageError(f"checkpoint does not match model_{ckpt['model_name']}.py: {str(e).splitlines()[0]}") from None
    return model


# ----------------------------------------------------------------------------- training


def lr_at(it, opts):
    """Linear warmup, then cosine decay from lr to min_lr at max_iters."""
    if it < opts["warmup_iters"]:
        return opts["lr"] * (it + 1) / (opts["warmup_iters"] + 1)
    progress = (it - opts["warmup_iters"]) / max(1, opts["max_iters"] - opts["warmup_iters"])
    return opts["min_lr"] + 0.5 * (1 + math.cos(math.pi * min(1.0, progress))) * (opts["lr"] - opts["min_lr"])


def pick_device(opts):
    device = opts["device"]
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    dtype = opts["dtype"]
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") and torch.cuda.is_bf16_supported() else "float32"
    if dtype not in ("float32", "bfloat16"):
        raise UsageError(f"dtype must be auto, float32 or bfloat16, got {dtype!r}")
    return device, dtype


def fmt_time(s):
    return f"{int(s // 3600)}h{int(s % 3600 // 60):02d}m" if s >= 3600 else f"{int(s // 60)}m{int(s % 60):02d}s"


def train(opts, overrides, module):
    ddp = int(os.environ.get("WORLD_SIZE", "1")) > 1
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    device, dtype = pick_device(opts)
    if ddp:
        import torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel
        if device.startswith("cuda"):
            device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    master = rank == 0
    log = print if master else (lambda *a, **k: None)
    out_dir = Path(opts["out_dir"])
    last_path, best_path = out_dir / "ckpt_last.pt", out_dir / "ckpt_best.pt"

    ckpt = None
    if opts["resume"]:
        ckpt = load_checkpoint(last_path)
        if ckpt["model_name"] != opts["model"]:
            raise UsageError(f"{last_path} holds a {ckpt['model_name']} model, not {opts['model']}")
        for k, v in overrides.items():
            if ckpt["model_config"].get(k) != v:
                raise UsageError(f"--{k}={v} differs from the checkpoint's {k}={ckpt['model_config'].get(k)}")

    torch.manual_seed(opts["seed"])  # the same initial weights on every rank
    data = SynthData(opts) if opts["dataset"] in SYNTHETIC else TextData(opts)
    if ckpt is not None and ckpt["tokenizer"] != data.tokenizer_spec:
        raise UsageError(f"{last_path} was trained with another tokenizer than dataset {opts['dataset']} has")
    if ckpt is not None:
        model = model_from_checkpoint(ckpt)
    else:
        vocab = overrides.pop("vocab_size", data.vocab_size)
        if vocab < data.vocab_size:
            raise UsageError(f"vocab_size {vocab} is smaller than the tokenizer's {data.vocab_size}")
        try:
            model = module.Model(module.Config(**overrides, vocab_size=vocab))
        except ValueError as e:
            raise UsageError(str(e)) from None
    cfg = model.config
    data.check(cfg.block_size)
    model.to(device)
    raw_model = model
    stretch = data.extrapolate if master else 0
    long_model, why = stretched(module, raw_model, stretch) if stretch else (None, "")
    if long_model is not None:
        long_model.to(device).eval()
    optimizer = torch.optim.AdamW(model.optim_groups(opts["weight_decay"]), lr=opts["lr"],
                                  betas=(opts["beta1"], opts["beta2"]))
    start_iter, best_val = 0, float("inf")
    gen = torch.Generator().manual_seed(opts["seed"] + rank)  # the data stream: each rank its own
    torch.manual_seed(opts["seed"] + rank)  # dropout
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        start_iter, best_val = ckpt["iter"], ckpt["best_val"]
        rng = ckpt["rng"][rank] if rank < len(ckpt["rng"]) else ckpt["rng"][0]
        gen.set_state(rng["data"])
        torch.set_rng_state(rng["torch"])
        if device.startswith("cuda") and "cuda" in rng:
            torch.cuda.set_rng_state(rng["cuda"])
    if opts["compile"]:
        model = torch.compile(model)
    if ddp:
        model = DistributedDataParallel(model, device_ids=[int(device.split(":")[1])] if device.startswith("cuda") else None)
    autocast = (torch.autocast(device.split(":")[0], dtype=torch.bfloat16) if dtype == "bfloat16"
                else contextlib.nullcontext())

    tokens_per_iter = opts["batch_size"] * cfg.block_size * opts["grad_accum"] * world
    n_params, n_active = raw_model.num_params(), raw_model.num_params(active=True)
    flops = raw_model.flops_per_token()
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

    metrics_path = out_dir / "metrics.jsonl"
    if master:
        out_dir.mkdir(parents=True, exist_ok=True)
        kept = []
        if ckpt is not None and metrics_path.is_file():  # drop what the interrupted run logged after its checkpoint
            kept = [l for l in metrics_path.read_text().splitlines()
                    if json.loads(l)["iter"] < start_iter or (json.loads(l)["iter"] == start_iter and "val_loss" in l)]
        metrics_path.write_text("".join(l + "\n" for l in kept))

    def record(row):
        if master:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")

    @torch.no_grad()
    def evaluate():
        raw_model.eval()
        eval_gen = torch.Generator().manual_seed(opts["seed"] + 999)  # the same batches at every evaluation

        def measure(model, split, T):
            """Mean loss, and the share of scored targets (answers; every token of a text) that the
            likeliest prediction gets right."""
            losses, right, scored = [], 0, 0
            for _ in range(opts["eval_iters"]):
                x, y = data.batch(split, opts["batch_size"], T, eval_gen)
                x, y = x.to(device), y.to(device)
                with autocast:
                    logits, loss = model(x, y)
                losses.append(loss.item())
                right += (logits.argmax(-1) == y)[y != -1].sum().item()
                scored += (y != -1).sum().item()
            return sum(losses) / len(losses), right / scored

        out = {}
        out["train_loss"], _ = measure(raw_model, "train", cfg.block_size)
        out["val_loss"], out["val_acc"] = measure(raw_model, "val", cfg.block_size)
        if long_model is not None:
            long_model.load_state_dict(raw_model.state_dict())
            _, out[f"val_acc_{stretch}x"] = measure(long_model, "val", stretch * cfg.block_size)
        raw_model.train()
        return out

    def rng_states():
        """Every rank's random state (data stream, dropout): what exact resumption needs."""
        mine = {"data": gen.get_state(), "torch": torch.get_rng_state(),
                **({"cuda": torch.cuda.get_rng_state(device)} if device.startswith("cuda") else {})}
        if not ddp:
            return [mine]
        gathered = [None] * world
        dist.all_gather_object(gathered, mine)
        return gathered

    model.train()
    t_start, t_last, it = time.time(), time.time(), start_iter
    train_time = 0.0  # seconds in training steps alone (no evaluation, no checkpoints): for tokens/s
    for it in range(start_iter, opts["max_iters"] + 1):
        if it % opts["eval_interval"] == 0 or it == opts["max_iters"]:
            if not (ckpt is not None and it == start_iter):  # the checkpoint we resume from was made here
                ev, improved = evaluate() if master else {}, False
                stats = raw_model.stats()
                if master:
                    extra = "".join(f" | {name} {v:.3g}" for name, v in {**ev, **stats}.items() if "loss" not in name)
                    log(f"eval {it} | train {ev['train_loss']:.4f} | val {ev['val_loss']:.4f}{extra}")
                    record({"iter": it, **ev, **stats, "tokens": it * tokens_per_iter, "time": time.time() - t_start,
                            "train_time": train_time})
                    improved = ev["val_loss"] < best_val
                    best_val = min(best_val, ev["val_loss"])
                rngs = rng_states()  # collective: every rank takes part
                if master:
                    state = {"model": raw_model.state_dict(), "model_name": opts["model"],
                             "model_config": dataclasses.asdict(cfg), "tokenizer": data.tokenizer_spec,
                             "optimizer": optimizer.state_dict(), "iter": it, "best_val": best_val,
                             "rng": rngs, "options": opts}
                    atomic_write(last_path, state)
                    if improved:
                        atomic_write(best_path, state)
        if it == opts["max_iters"]:
            break
        t_step = time.time()
        lr = lr_at(it, opts)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=device)
        for micro in range(opts["grad_accum"]):
            x, y = data.batch("train", opts["batch_size"], cfg.block_size, gen)
            sync = not ddp or micro == opts["grad_accum"] - 1  # DDP: all-reduce only on the last micro-batch
            with model.no_sync() if not sync else contextlib.nullcontext():
                with autocast:
                    _, loss = model(x.to(device), y.to(device))
                (loss / opts["grad_accum"]).backward()
            loss_sum += loss.detach() / opts["grad_accum"]
        if ddp:
            dist.all_reduce(loss_sum)  # every rank sees the same mean loss and so stops together
            loss_sum /= world
        loss_val = loss_sum.item()
        if not math.isfinite(loss_val):
            die(f"loss is {loss_val} at iter {it}; stopping. {last_path} still holds the last good state "
                f"(try a lower --lr or --grad_clip)", code=1)
        if opts["grad_clip"] > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), opts["grad_clip"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        train_time += time.time() - t_step
        record({"iter": it, "loss": loss_val, "lr": lr})
        if (it + 1) % opts["log_interval"] == 0 or it == start_iter:
            now = time.time()
            steps = opts["log_interval"] if it != start_iter else 1
            dt = (now - t_last) / steps
            t_last = now
            mfu = f" | mfu {flops * tokens_per_iter / dt / peak / world:.1%}" if peak else ""
            log(f"iter {it + 1} | loss {loss_val:.4f} | lr {lr:.2e} | {dt * 1000:.1f} ms/iter | "
                f"{tokens_per_iter / dt:,.0f} tok/s{mfu} | eta {fmt_time(dt * (opts['max_iters'] - it - 1))}")
    log(f"done: best val loss {best_val:.4f}, {fmt_time(time.time() - t_start)}; checkpoints in {out_dir}")
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
