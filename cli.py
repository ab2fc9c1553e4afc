"""
What train.py and sample.py share around the models: the model registry, the command line, the
choice of device, and the one kind of error a user can cause.

    MODELS                    name -> model file: registering a model is one word here
    UsageError, die           bad input is one line on stderr and exit code 2, never a traceback
    read_args, typed          presets (*.py) and --name=value overrides, checked against their types
    pick_device               auto -> cuda, mps or cpu; anything named must exist here
"""
import importlib
import os
import sys
from pathlib import Path

import torch

# name -> the model file model_NAME.py. Every model file offers the same interface (Config, Model,
# forward, generate, ...); train.py, sample.py and the contract tests in test_models.py take every
# model named here, so registering one is adding its name to this line.
MODELS = {name: importlib.import_module(f"model_{name}") for name in ("transformer", "moe", "mamba", "hybrid")}


class UsageError(Exception):
    """Bad input from the user: reported as one line, exit code 2."""


def die(msg, code=2):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(code)


def one_line(e):
    """An exception as one line of text, for messages that quote it."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[-1].strip() if lines else ''}"


def read_text(path, what):
    """A UTF-8 text file, or one line saying why not."""
    if not os.path.isfile(path):
        raise UsageError(f"{what} {path} is not a file")
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"{what} {path} is not UTF-8 text (byte {e.start}: {e.object[e.start:e.start + 1]!r})") from None
    except OSError as e:
        raise UsageError(f"cannot read {what} {path}: {e.strerror}") from None


# ----------------------------------------------------------------------------- command line


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
            try:  # a preset is trusted python, like nanoGPT's configurator; its mistakes are still one line
                exec(compile(read_text(arg, "preset"), arg, "exec"), {}, ns)
            except Exception as e:
                raise UsageError(f"preset {arg} fails: {one_line(e)}") from None
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


# ----------------------------------------------------------------------------- device


def pick_device(device="auto", dtype="auto"):
    """'auto' -> the best there is; anything named must exist on this machine. -> (device, dtype)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    kind, _, index = device.partition(":")
    if kind not in ("cpu", "cuda", "mps") or (index and (kind != "cuda" or not index.isdigit())):
        raise UsageError(f"device must be auto, cpu, cuda, cuda:N or mps, got {device!r}")
    if kind == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {device}: this torch ({torch.__version__}) sees no CUDA GPU; use --device=cpu")
    if kind == "cuda" and index and int(index) >= torch.cuda.device_count():
        raise UsageError(f"device {device}: there are only {torch.cuda.device_count()} CUDA devices")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise UsageError("device mps is not available here; use --device=cpu")
    if dtype == "auto":
        dtype = "bfloat16" if kind == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    if dtype not in ("float32", "bfloat16"):
        raise UsageError(f"dtype must be auto, float32 or bfloat16, got {dtype!r}")
    return device, dtype
