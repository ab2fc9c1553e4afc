"""
Tokens in and out: what train.py and sample.py read and write besides the models. Nothing here
knows how a model works inside.

    Tokenizer, bpe_spec       characters, words (synthetic tasks), tiktoken byte-pair encoding, or a
                              Hugging Face tokenizer.json (pretrained models)
    TextData                  the built-in pydoc corpus, tiny Shakespeare, any text file: token caches
    SynthData                 selective_copy, multi_induction, induction_heads, mqar, generated from a
                              random generator
    load_checkpoint, ...      checkpoint files: weights_only loading, atomic writes; a checkpoint
                              carries its tokenizer, so restoring one builds a Tokenizer here
"""
import base64
import dataclasses
import hashlib
import json
import os
import urllib.request
from pathlib import Path

import numpy as np
import torch

from cli import MODELS, UsageError, one_line, read_text

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"


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
        elif spec["kind"] == "hf":  # a pretrained model's tokenizer.json
            try:
                import tokenizers
            except ImportError:
                raise UsageError("this model's tokenizer.json needs the tokenizers package (pip install tokenizers)") from None
            self.enc = tokenizers.Tokenizer.from_str(spec["json"])
            self.vocab_size = self.enc.get_vocab_size()
            self.byte_level = "ByteLevel" in json.dumps(json.loads(spec["json"]).get("decoder"))
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
        if self.spec["kind"] == "hf":
            return self.enc.encode(text, add_special_tokens=False).ids
        return self.enc.encode_ordinary(text)

    def decode_bytes(self, ids):
        if self.spec["kind"] == "words":
            return "".join(" " + self.words[i] for i in ids).encode()
        if self.spec["kind"] == "char":
            return "".join(self.chars[i] for i in ids).encode()
        if self.spec["kind"] == "hf":  # token by token, exactly: a token may hold part of a character
            pieces = [self.enc.id_to_token(i) or "" for i in ids]
            if self.byte_level:  # GPT-2's trick: every byte written as a printable character
                return bytes(BYTE_OF.get(c, 32) for p in pieces for c in p)
            return b"".join(bytes([int(p[3:5], 16)]) if len(p) == 6 and p.startswith("<0x") and p.endswith(">")
                            else p.replace("\u2581", " ").encode() for p in pieces)  # SentencePiece: \u2581 is a space
        return self.enc.decode_bytes(ids)

    def decode(self, ids):
        return self.decode_bytes(ids).decode("utf-8", errors="replace")


# GPT-2's byte-level alphabet, read backwards: printable bytes stand for themselves, the others for 256 + n
PRINTABLE = [*range(33, 127), *range(161, 173), *range(174, 256)]
BYTE_OF = {**{chr(b): b for b in PRINTABLE}, **{chr(256 + n): b for n, b in enumerate(sorted(set(range(256)) - set(PRINTABLE)))}}


def bpe_spec(name_or_path, data_dir):
    """A tiktoken encoding as plain data. Named encodings come from tiktoken (which downloads and
    caches them), or from data_dir/NAME.tiktoken when that file is there; a path to a .tiktoken
    ranks file is split with GPT-2's pattern and gets <|endoftext|> after the last rank. A path to a
    tokenizer.json is a pretrained model's own tokenizer (the tokenizers package reads it)."""
    if name_or_path.endswith(".json"):
        spec = {"kind": "hf", "json": read_text(name_or_path, "tokenizer file")}
        try:
            Tokenizer(spec)
        except UsageError:
            raise
        except Exception as e:
            raise UsageError(f"{name_or_path} is not a tokenizer.json: {one_line(e)}") from None
        return spec
    import tiktoken
    local = Path(name_or_path) if name_or_path.endswith(".tiktoken") else Path(data_dir) / f"{name_or_path}.tiktoken"
    if local.is_file():
        from tiktoken_ext.openai_public import r50k_pat_str
        text = read_text(local, "tokenizer file")
        n = sum(1 for line in text.splitlines() if line)
        spec = {"kind": "bpe", "name": local.stem, "pat_str": r50k_pat_str, "ranks": text,
                "special": {"<|endoftext|>": n}}
        try:
            Tokenizer(spec)
        except Exception as e:
            raise UsageError(f"{local} is not a tiktoken ranks file (lines of base64 token, rank): {one_line(e)}") from None
        return spec
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
    return read_text(path, "dataset")


def tokenizer_key(name_or_path):
    """A tokenizer's part of a cache folder name: its content, where it is a file (every model's is tokenizer.json)."""
    if not os.path.isfile(name_or_path):
        return Path(name_or_path).stem
    return f"{Path(name_or_path).stem}-{hashlib.sha1(Path(name_or_path).read_bytes()).hexdigest()[:10]}"


def prepare_text(name, data_dir, tokenizer=""):
    """Tokenize a corpus once and cache train/val token files under data_dir. tokenizer '' means the
    dataset's own. Returns (train tokens, val tokens, tokenizer spec). The split is the first 90% / last 10%."""
    data_dir = Path(data_dir)
    if name in ("pydoc", "shakespeare_char", "shakespeare"):
        default_tok = "gpt2" if name == "shakespeare" else "char"
        load = builtin_text if name == "pydoc" else lambda: shakespeare_text(data_dir)
        key = f"{name}" if not tokenizer else f"{name}-{tokenizer_key(tokenizer)}"
    elif os.path.isdir(name):
        raise UsageError(f"dataset {name} is a directory; give a text file")
    elif os.path.isfile(name):
        default_tok, load = "char", lambda: read_text(name, "dataset")
        digest = hashlib.sha1(Path(name).read_bytes()).hexdigest()[:10]
        key = f"{Path(name).stem}-{tokenizer_key(tokenizer or 'char')}-{digest}"
    else:
        raise UsageError(f"unknown dataset {name!r}: pydoc, shakespeare_char, shakespeare or a path to a text file")
    if data_dir.exists() and not data_dir.is_dir():
        raise UsageError(f"data_dir {data_dir} is a file, not a directory")
    tok_name = tokenizer or default_tok
    cache = data_dir / key
    if (cache / "meta.json").is_file():
        meta = json.loads((cache / "meta.json").read_text())
    else:
        text = load()
        if not text.strip():
            raise UsageError(f"dataset {name} is empty")
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
    guess = None  # no no-recall baseline for text

    def __init__(self, dataset, data_dir="data", tokenizer=""):
        self.train, self.val, self.tokenizer_spec = prepare_text(dataset, data_dir, tokenizer)
        self.vocab_size = Tokenizer(self.tokenizer_spec).vocab_size
        self.describe = (f"{dataset} ({self.tokenizer_spec['kind']}, vocab {self.vocab_size}): "
                         f"{len(self.train):,} train / {len(self.val):,} val tokens")

    def check(self, block_size):
        for split, tokens in (("validation", self.val), ("training", self.train)):
            if block_size + 1 > len(tokens):
                raise UsageError(f"block_size {block_size} is longer than the {split} split ({len(tokens)} tokens): "
                                 f"use a smaller --block_size or more text")

    def batch(self, split, batch_size, block_size, gen):
        data = self.train if split == "train" else self.val
        start = torch.randint(len(data) - block_size, (batch_size,), generator=gen)  # (B,)
        window = data[start[:, None] + torch.arange(block_size + 1)]  # (B, T+1)
        return window[:, :-1], window[:, 1:]


SYNTHETIC = ("selective_copy", "multi_induction", "induction_heads", "mqar")
VAL_SEED = 2**40  # validation batches come from generators seeded from here up; training uses --seed + rank


class SynthData:
    """Synthetic recall tasks, generated on the fly from the random generator it is given: no files,
    no network. A sequence is block_size + 1 tokens; x is all but the last, y all but the first, and
    y is -1 (ignored by the loss and the accuracy) except where the next token is an answer.

    selective_copy  copy_tokens data symbols at random places in a run of noise '.', then '>' and
                    the same symbols in order (the Mamba paper's selective copying, section 4.1.1):
                        . 3 . . 7 . . . 1 . > 3 7 1                      answers: 3 7 1
    multi_induction random symbols in which multi_induction_queries keys appear once each, followed by
                    some value; at the end '!' and each key again, in another order: the answers are
                    the values (associative recall with several queries, in the spirit of induction
                    heads, Olsson et al. 2022, and the H3 paper's associative recall). Several keys per
                    sequence, each scored, so that a small model gets enough answers to learn from in a
                    CPU budget. Not the Mamba paper's task (that is induction_heads). Also scored at
                    extrapolate x block_size.
                        4 2 8 5 9 0 3 ... 6 ! 8 5 ! 0 3                  answers: 5 3
    induction_heads the Mamba paper's induction heads (Gu & Dao 2023, section 4.1.2, appendix E.1):
                    random symbols, the special token '!' once somewhere, followed by a symbol; at the
                    end '!' again, and the answer is the symbol that followed the first one. One
                    scored answer per sequence, the last token. The paper trains at length 256 with
                    a vocabulary of 16 and tests at 64 to 2^20; here task_vocab symbols plus '!'.
                    Also scored at extrapolate x block_size.
                        4 2 ! 7 9 0 3 ... 6 !                            answer: 7
    mqar            mqar_pairs key-value pairs, then noise in which mqar_queries keys are asked
                    again, each followed by its value (multi-query associative recall, Zoology,
                    Arora et al. 2023): k3 v1 k0 v7 k5 v2 . . k0 v7 . . k3 v1 . answers: v7 v1

    Chance (1 / task_vocab) flatters a model: part of every task can be answered without recalling
    anything. `guess` is that no-recall rule, scored on the same batches as the model (val_baseline):
    selective_copy and mqar answer the symbol that occurs most often among the sequence's data
    symbols (values) at every answer (knows the bag, not the order or the pairing: 0.258 for 8 of 16);
    multi_induction answers the smallest symbol that is not a key (the value is never a key, so
    1 / (task_vocab - multi_induction_queries)); induction_heads answers the most frequent symbol of
    the sequence (a little above 1 / task_vocab, as the answer is among the symbols it counts: 0.09 at
    length 256 with 16 symbols, 0.12 at 64)."""

    def __init__(self, task, *, task_vocab, copy_tokens, mqar_pairs, mqar_queries, multi_induction_queries, extrapolate=0):
        self.task, V = task, task_vocab
        self.task_vocab, self.copy_tokens, self.multi_induction_queries = task_vocab, copy_tokens, multi_induction_queries
        self.mqar_pairs, self.mqar_queries = mqar_pairs, mqar_queries
        symbols = [str(i) for i in range(V)]
        words = {"selective_copy": [".", ">"] + symbols, "multi_induction": ["!"] + symbols, "induction_heads": ["!"] + symbols,
                 "mqar": ["."] + [f"k{i}" for i in range(V)] + [f"v{i}" for i in range(V)]}[self.task]
        self.tokenizer_spec = {"kind": "words", "words": words}
        self.vocab_size = len(words)
        self.extrapolate = extrapolate if self.task in ("multi_induction", "induction_heads") else 0
        self.describe = (f"{self.task} (synthetic, words, vocab {self.vocab_size}): generated from the seed, "
                         f"scored on the answers only; chance {1 / V:.3f}, no-recall baseline: val_baseline")

    def check(self, block_size):
        need = {"selective_copy": (2 * self.copy_tokens, "2 * copy_tokens"),
                "multi_induction": (5 * self.multi_induction_queries - 1, "5 * multi_induction_queries - 1"),
                "induction_heads": (3, "3"),
                "mqar": (2 * self.mqar_pairs + 2 * self.mqar_queries - 1, "2 * (mqar_pairs + mqar_queries) - 1")}
        least, formula = need[self.task]
        if block_size < least:
            raise UsageError(f"{self.task} needs block_size >= {formula} = {least}, got {block_size}")

    def batch(self, split, batch_size, block_size, gen):
        if split == "val":  # a generator of its own, seeded apart from the training stream
            gen = torch.Generator().manual_seed(VAL_SEED + int(torch.randint(2**31, (), generator=gen)))
        B, L, V = batch_size, block_size + 1, self.task_vocab
        seq = torch.zeros(B, L, dtype=torch.long)  # (B, L): token 0 is the noise '.' (the induction tasks: '!')
        answer = torch.zeros(B, L, dtype=torch.bool)  # (B, L): which tokens are answers
        if self.task == "selective_copy":  # symbols are tokens 2 .. V+1
            n = self.copy_tokens
            body = L - 1 - n
            data = 2 + torch.randint(V, (B, n), generator=gen)  # (B, n)
            where = torch.rand(B, body, generator=gen).argsort(dim=1)[:, :n].sort(dim=1).values  # (B, n) distinct, in order
            seq[:, :body].scatter_(1, where, data)
            seq[:, body] = 1  # '>': now repeat them
            seq[:, body + 1:] = data
            answer[:, body + 1:] = True
        elif self.task == "multi_induction":  # symbols are tokens 1 .. V; the tail is Q times '!' key value
            Q = self.multi_induction_queries
            body = L - 3 * Q
            order = 1 + torch.rand(B, V, generator=gen).argsort(dim=1)  # (B, V): keys first, then the rest
            key, other = order[:, :Q], order[:, Q:]  # (B, Q), (B, V-Q)
            pick = lambda n: other.gather(1, torch.randint(V - Q, (B, n), generator=gen))  # (B, n) non-keys
            value = pick(Q)  # (B, Q): never a key, so every key occurs exactly once before the tail
            seq[:, :body] = pick(body)
            where = 2 * torch.rand(B, body // 2, generator=gen).argsort(dim=1)[:, :Q]  # (B, Q) distinct pair slots
            seq.scatter_(1, where, key).scatter_(1, where + 1, value)
            asked = torch.rand(B, Q, generator=gen).argsort(dim=1)  # (B, Q): the order of the questions
            tail = body + 3 * torch.arange(Q)  # (Q,): where each '!' (token 0) goes
            seq[:, tail + 1], seq[:, tail + 2] = key.gather(1, asked), value.gather(1, asked)
            answer[:, tail + 2] = True
        elif self.task == "induction_heads":  # symbols are tokens 1 .. V; '!' (token 0) at `first` and at L - 2
            seq = 1 + torch.randint(V, (B, L), generator=gen)
            first = torch.randint(L - 3, (B, 1), generator=gen)  # (B, 1): 0 .. L-4, so its symbol comes before the last '!'
            seq.scatter_(1, first, 0)
            seq[:, L - 2] = 0
            seq[:, L - 1] = seq.gather(1, first + 1)[:, 0]  # the answer: the symbol after the first '!'
            answer[:, L - 1] = True
        else:  # mqar: keys are tokens 1 .. V, values V+1 .. 2V
            P, Q = self.mqar_pairs, self.mqar_queries
            keys = 1 + torch.rand(B, V, generator=gen).argsort(dim=1)[:, :P]  # (B, P) distinct
            values = 1 + V + torch.randint(V, (B, P), generator=gen)  # (B, P)
            seq[:, 0:2 * P:2], seq[:, 1:2 * P:2] = keys, values
            asked = torch.randint(P, (B, Q), generator=gen)  # (B, Q): which pair each query asks for
            where = 2 * P + 2 * torch.rand(B, (L - 2 * P) // 2, generator=gen).argsort(dim=1)[:, :Q]  # (B, Q)
            seq.scatter_(1, where, keys.gather(1, asked)).scatter_(1, where + 1, values.gather(1, asked))
            answer.scatter_(1, where + 1, True)
        return seq[:, :-1], seq[:, 1:].masked_fill(~answer[:, 1:], -1)  # (B, T) each

    def guess(self, x):
        """x (B, T) -> (B,): the no-recall rule's one answer for every question of a sequence (class text)."""
        B, T, V = *x.shape, self.task_vocab
        if self.task == "multi_induction":  # the keys are the tokens right after each '!'
            keys = torch.zeros(B, V + 1, dtype=torch.bool).scatter_(1, x[:, 1:][x[:, :-1] == 0].view(B, -1), True)
            keys[:, 0] = True  # '!' is no answer either
            return (~keys).int().argmax(1)  # (B,): the smallest symbol that is not a key
        if self.task == "mqar":
            data = x[:, 1:2 * self.mqar_pairs:2]  # (B, P): the values of the pairs
        elif self.task == "induction_heads":  # every symbol of the sequence; '!' (token 0) is set aside below
            data = x
        else:
            data = x[:, :T - self.copy_tokens]  # (B, body): the noise and the data symbols before '>'
        counts = torch.zeros(B, self.vocab_size, dtype=torch.long).scatter_add_(1, data, torch.ones_like(data))
        counts[:, :1 if self.task == "induction_heads" else 2] = 0  # the noise '.' and '>' (mqar: '.' and k0,
        # never among the values; induction_heads: '!') are no answers
        return counts.argmax(1)  # (B,): the most frequent data symbol


# ----------------------------------------------------------------------------- checkpoints


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
    fields, config = {f.name for f in dataclasses.fields(module.Config)}, ckpt["model_config"]
    if not isinstance(config, dict):
        raise UsageError(f"checkpoint's model_config is a {type(config).__name__}, not a dict of Config fields")
    unknown, lacking = sorted(config.keys() - fields), sorted(fields - config.keys())  # a default might be another model
    if unknown or lacking:
        raise UsageError(f"checkpoint does not match model_{ckpt['model_name']}.py (made by another version?): "
                         f"unknown Config fields [{', '.join(unknown)}], missing [{', '.join(lacking)}]")
    try:
        model = module.Model(module.Config(**config))
        model.load_state_dict(ckpt["model"])
        tok = Tokenizer(ckpt["tokenizer"])
    except Exception as e:
        raise UsageError(f"checkpoint does not match model_{ckpt['model_name']}.py: {one_line(e)}") from None
    if tok.vocab_size > model.config.vocab_size:
        raise UsageError(f"checkpoint's tokenizer has {tok.vocab_size} tokens, its model only {model.config.vocab_size}")
    return model, tok
