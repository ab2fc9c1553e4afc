"""
Generate text from a checkpoint, streaming tokens as they come.

    python sample.py                                  # from out/ckpt_best.pt
    python sample.py --prompt="To be" --num_samples=3 --temperature=0.8 --top_k=50
    python sample.py --prompt_file=prompt.txt --top_p=0.9 --ckpt=out/ckpt_last.pt
    python sample.py --init_from=gpt2 --prompt="Hello"    # a Hugging Face model: hub name or directory

The checkpoint names its model file and carries its tokenizer, so nothing else is needed. A Hugging
Face model brings its own tokenizer (GPT-2's through tiktoken, the others' tokenizer.json).
Generation runs the prompt through the model in one parallel pass, then feeds one token at a
time against the model's cache (keys and values for attention, a fixed-size state for Mamba).
"""
import codecs
import sys
import time

import torch

import pretrained
from cli import UsageError, die, pick_device, read_args, read_text, typed
from data import Tokenizer, load_checkpoint, model_from_checkpoint

OPTIONS = {
    "ckpt": ("out/ckpt_best.pt", "checkpoint to sample from"),
    "init_from": ("", "sample from a Hugging Face model instead: a directory (config.json, *.safetensors) or hub name"),
    "data_dir": ("data", "where gpt2.tiktoken is looked for (GPT-2's tokenizer; else tiktoken downloads it)"),
    "prompt": ("\n", "text to continue"),
    "prompt_file": ("", "read the prompt from this file instead"),
    "num_samples": (1, "how many samples"),
    "max_new_tokens": (500, "tokens per sample"),
    "temperature": (0.8, "0 = greedy; higher = more random"),
    "top_k": (200, "sample among the k likeliest tokens (0 = all)"),
    "top_p": (1.0, "nucleus sampling: the smallest set of tokens with this much probability"),
    "seed": (1337, "random seed"),
    "device": ("auto", "auto | cpu | cuda | cuda:N | mps"),
}


def main(argv):
    if "-h" in argv or "--help" in argv:
        print(__doc__.strip(), "\n\noptions:")
        for name, (default, text) in OPTIONS.items():
            print(f"  {f'--{name}={default!r}':<28} {text}")
        return
    try:
        given = typed(read_args(argv), {k: type(v) for k, (v, _) in OPTIONS.items()}, script="sample.py")
        opts = {k: given.get(k, v) for k, (v, _) in OPTIONS.items()}
        if opts["num_samples"] <= 0 or opts["max_new_tokens"] < 0 or opts["temperature"] < 0 or opts["top_k"] < 0:
            raise UsageError("num_samples must be positive; max_new_tokens, temperature and top_k >= 0")
        if not 0 < opts["top_p"] <= 1:
            raise UsageError(f"top_p must be in (0, 1], got {opts['top_p']}")
        prompt = read_text(opts["prompt_file"], "prompt file") if opts["prompt_file"] else opts["prompt"]
        device, _ = pick_device(opts["device"], "float32")
        name, model, tok = from_pretrained(opts) if opts["init_from"] else from_checkpoint(opts["ckpt"])
        ids = tok.encode(prompt or "\n")
    except UsageError as e:
        die(str(e))
    model.to(device).eval()
    torch.manual_seed(opts["seed"])
    prompt_ids = torch.tensor([ids], dtype=torch.long, device=device)  # (1, T)
    n_tokens, elapsed = 0, 0.0
    for k in range(opts["num_samples"]):
        print(f"--- sample {k + 1} ---\n{prompt}", end="", flush=True)
        utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")  # BPE tokens can split a character
        t0 = time.time()
        for token in model.generate(prompt_ids, opts["max_new_tokens"], temperature=opts["temperature"],
                                    top_k=opts["top_k"] or None, top_p=opts["top_p"]):
            print(utf8.decode(tok.decode_bytes(token[0].tolist())), end="", flush=True)
            n_tokens += 1
        print(utf8.decode(b"", final=True))
        elapsed += time.time() - t0
    print(f"--- {n_tokens} tokens in {elapsed:.2f}s: {n_tokens / max(elapsed, 1e-9):.1f} tokens/s "
          f"({name}, {device})", file=sys.stderr)


def from_checkpoint(path):
    ckpt = load_checkpoint(path)
    return (ckpt["model_name"], *model_from_checkpoint(ckpt))


def from_pretrained(opts):
    name, model = pretrained.load_model(opts["init_from"])
    tok = Tokenizer(pretrained.tokenizer_spec(opts["init_from"], opts["data_dir"]))
    if tok.vocab_size > model.config.vocab_size:
        raise UsageError(f"{opts['init_from']}: the tokenizer has {tok.vocab_size} tokens, the model only {model.config.vocab_size}")
    return f"{name}, {opts['init_from']}", model, tok


if __name__ == "__main__":
    main(sys.argv[1:])
