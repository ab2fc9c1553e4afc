import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton kernels run on the CPU in tests; set before kernels import

import base64
import dataclasses
import functools
import inspect
import json
import math
import shutil
import signal
import subprocess
import sys
import urllib.error
import urllib.request
import xml.etree.ElementTree as ET
import zlib
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import kernels
import model_hybrid
import model_mamba
import model_moe
import model_transformer
import data
import pretrained
import sample
import train
from cli import MODELS, UsageError

# The suite reads top to bottom like the README: first the contract every model file keeps, then one
# section per concept in the order of the README's "Concept -> code -> flag" table, then the scripts.

REPO = Path(__file__).resolve().parent
# subprocesses: this interpreter (sys.executable), one thread, an explicit device, and the Triton interpreter
# only where a test asks for it
ENV = {**{k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}, "OMP_NUM_THREADS": "1"}
TINY_ARGS = ["--n_layer=1", "--d_model=32", "--n_head=2", "--n_kv_head=1", "--block_size=32", "--batch_size=4",
             "--eval_iters=2", "--warmup_iters=2", "--device=cpu"]
# The kernel tests run Triton under the interpreter on the CPU, or compiled on a GPU when
# TRITON_INTERPRET=0 (gpu_check.sh); needs_gpu marks the checks at full size on a GPU.
TRITON_DEVICE = "cpu" if kernels.INTERPRET else "cuda"
needs_triton = pytest.mark.skipif(not kernels.INTERPRET and not torch.cuda.is_available(),
                                  reason="Triton needs TRITON_INTERPRET=1 or a CUDA GPU")
needs_gpu = pytest.mark.skipif(kernels.INTERPRET or not torch.cuda.is_available(),
                               reason="needs a CUDA GPU and TRITON_INTERPRET unset")


def run(script, *args, timeout=120):
    return subprocess.run([sys.executable, str(REPO / script), *args], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("data"))


@pytest.fixture(autouse=True)
def seed_from_the_test_id(request):
    """Random inputs drawn from the test's own id: the same whatever runs before it (-k, -x, order)."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


# ----------------------------------------------------------------------------- the contract of every model file
# The four model files, each on its tiny config and variants: what train.py and sample.py rely on

# Every model registered in cli.MODELS is held to the contract below, at a tiny size: the fields of
# TINY that its Config has, then the shape the shipped files are tested at (SHAPE), then the case.
TINY = dict(vocab_size=61, block_size=40, d_model=48, n_layer=2, n_head=4)
SHAPE = {"mamba": dict(d_model=32, d_state=8), "hybrid": dict(d_model=32, layers="Md Me Ad Me", d_state=8, n_expert=4)}


def tiny_config(name, **kw):
    module = MODELS[name]
    fields = {f.name for f in dataclasses.fields(module.Config)}
    return module.Config(**{**{k: v for k, v in TINY.items() if k in fields}, **SHAPE.get(name, {}), **kw})


def tiny(name, **kw):
    torch.manual_seed(0)
    return MODELS[name].Model(tiny_config(name, **kw)).eval()


def train_args(name):
    """TINY_ARGS that this model's Config or train.py takes: a tiny train.py run of any registered model."""
    known = {f.name for f in dataclasses.fields(MODELS[name].Config)} | set(train.OPTIONS)
    return [f"--model={name}", *(a for a in TINY_ARGS if a[2:].split("=")[0] in known)]


tiny_transformer, tiny_moe, tiny_mamba, tiny_hybrid = (functools.partial(tiny, name) for name in ("transformer", "moe", "mamba", "hybrid"))


# The variants each model is held to: each of its switches at least once
ID = lambda v: "-".join(f"{k}={x}" for k, x in v.items())
VARIANTS = [  # every position scheme, MHA/GQA/MQA, both norms, pre/post, both ffns, both attention paths
    dict(pos="rope", n_kv_head=2),
    dict(pos="alibi", n_kv_head=1, ffn="gelu", norm="layernorm", prenorm=False, flash=False),
    dict(pos="learned", n_kv_head=4, ffn="gelu", norm="layernorm", bias=True),
    dict(pos="sinusoidal", n_kv_head=2, prenorm=False, flash=False),
    dict(pos="none", n_kv_head=1, ffn="gelu"),
    dict(pos="alibi", n_kv_head=4, tie_embeddings=False),
    dict(pos="rope", n_kv_head=1, flash=False, norm="layernorm"),
]
MOE_VARIANTS = [  # router, paths, shared and fine-grained experts, dense layers between, GELU experts
    dict(),
    dict(expert_path="loop", router="sigmoid"),
    dict(n_expert=16, top_k=4, d_expert=32, n_shared=1, moe_every=2, moe_offset=1),
    dict(ffn="gelu", norm_topk=False, n_kv_head=1, pos="alibi"),
]
MAMBA_VARIANTS = [dict(), dict(d_conv=1), dict(scan="loop"),  # a one-tap conv (no conv state), the scan as a loop
                  dict(selective="none"), dict(selective="dt", scan="loop"), dict(selective="bc")]  # LTI, half selective
HYBRID_VARIANTS = [  # both mixers, both feed-forwards, MoE after either mixer, bare layers, the shared block
    dict(),  # "Md Me Ad Me"
    dict(layers="Ae Md M Ad", n_kv_head=1, inner_norm=False, scan="ref"),
    dict(layers="M S Me S", n_kv_head=4),
]
CASE_VARIANTS = {"transformer": VARIANTS, "moe": MOE_VARIANTS, "mamba": MAMBA_VARIANTS, "hybrid": HYBRID_VARIANTS}
CASES = [pytest.param(name, v, id="-".join([name, ID(v)] if v else [name]))
         for name in MODELS for v in CASE_VARIANTS.get(name, [dict()])]


def check_cached_generation(m, new_tokens=25):
    """Greedy generation from a 9-token prompt must equal the argmax of the full forward, and
    feeding the same tokens through a cache one at a time must give the full forward's logits.
    Returns the cache, for the model's own checks."""
    prompt = torch.randint(0, 61, (2, 9))
    out = torch.cat([prompt, *m.generate(prompt, new_tokens, temperature=0)], dim=1)  # (2, 9 + new)
    full = m(out[:, :-1])[0]  # (2, 8 + new, V)
    assert torch.equal(full[:, 8:].argmax(-1), out[:, 9:])  # greedy tokens identical
    cache = m.new_cache(2)
    steps = [m(out[:, :9], cache=cache)[0][:, -1]]
    steps += [m(out[:, t:t + 1], cache=cache)[0][:, -1] for t in range(9, 8 + new_tokens)]
    torch.testing.assert_close(torch.stack(steps, 1), full[:, 8:], atol=1e-5, rtol=1e-5)
    return cache


def overfit(m, lr, steps=150):
    """Train on one tiny batch; return the final cross-entropy (auxiliary losses aside)."""
    x = torch.randint(0, 61, (4, 24))
    opt = torch.optim.AdamW(m.parameters(), lr=lr)
    for _ in range(steps):
        _, loss = m(x[:, :-1], x[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return m.aux["ce"].item()


@pytest.mark.parametrize("name, variant", CASES)
def test_causal_and_prefix_consistent(name, variant):
    m = tiny(name, **variant)
    idx = torch.randint(0, 61, (2, 30))
    changed = idx.clone()
    changed[:, 17] = (changed[:, 17] + 1) % 61  # token 17 surely changes, the later ones at random
    changed[:, 18:] = torch.randint(0, 61, (2, 12))
    a, b = m(idx)[0], m(changed)[0]
    if name in ("transformer", "mamba"):
        assert torch.equal(a[:, :17], b[:, :17])  # nothing before t may see token t
    else:
        # nothing before t may see token t. Not bit for bit: changing later tokens changes how many rows
        # each expert's matmul gets, and with several threads the blocking (so the rounding) of a row can
        # change with that; it measured ~3e-8 on 2 threads. A leak from the future would be ~1e-1.
        torch.testing.assert_close(a[:, :17], b[:, :17], atol=1e-6, rtol=1e-5)
    assert not torch.allclose(a[:, 17:], b[:, 17:])
    torch.testing.assert_close(m(idx[:, :12])[0], a[:, :12])  # a prefix alone gives the same outputs


@pytest.mark.parametrize("name, variant", CASES)
def test_cached_generation_equals_full_forward(name, variant):
    m = tiny(name, **variant)
    new_tokens = 45 if name == "mamba" else 25  # 54 tokens: past block_size on the fixed-size state; 34 < block_size
    cache = check_cached_generation(m, new_tokens)
    assert cache.len == 8 + new_tokens
    if name in ("transformer", "moe"):
        assert cache.k.shape[2] == m.config.n_kv_head  # the cache holds only the K/V heads
    if name == "hybrid":
        assert cache.k.shape[0] == m.config.n_attn  # K/V for the attention uses only
        assert cache.ssm.shape[0] == m.config.n_layer - m.config.n_attn


PREFILL = {"transformer": dict(pos="alibi"), "moe": dict(), "mamba": dict(), "hybrid": dict(layers="Md S Me Ad S")}


@pytest.mark.parametrize("name", MODELS)
def test_chunked_prefill_equals_token_by_token(name):
    m = tiny(name, **PREFILL.get(name, {}))
    idx = torch.randint(0, 61, (2, 30))
    full = m(idx)[0]
    cache1 = m.new_cache(2)
    steps = torch.cat([m(idx[:, t:t + 1], cache=cache1)[0] for t in range(30)], 1)
    torch.testing.assert_close(steps, full, atol=1e-5, rtol=1e-5)
    # chunks shorter than d_conv = 4, single tokens, and long ones
    for cuts in (((0, 7), (7, 8), (8, 30)), ((0, 2), (2, 3), (3, 6), (6, 7), (7, 30))):
        cache = m.new_cache(2)
        chunks = torch.cat([m(idx[:, a:b], cache=cache)[0] for a, b in cuts], 1)
        torch.testing.assert_close(chunks, steps, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(chunks, full, atol=1e-5, rtol=1e-5)
        for field in ("k", "v", "ssm", "conv"):  # every state the model keeps
            if hasattr(cache, field):
                tol = 1e-6 if field == "conv" else 1e-5
                torch.testing.assert_close(getattr(cache, field), getattr(cache1, field), atol=tol, rtol=1e-5, msg=field)
        assert m.cache_bytes(cache) == sum(getattr(cache, f).nbytes for f in ("k", "v", "ssm", "conv") if hasattr(cache, f))


SLIDE = {"transformer": dict(pos="learned"), "moe": dict(), "mamba": dict(), "hybrid": dict(layers="Md S Ae")}


@pytest.mark.parametrize("name", MODELS)
def test_generation_past_block_size_equals_a_full_forward_over_its_window(name):
    """Every greedy token is the argmax of a plain forward over the context it was drawn from: with a
    KV cache the last w tokens, w growing to block_size and then sliding back to its most recent half
    (positions restart with the window); with a recurrent state, everything so far."""
    m = tiny(name, block_size=16, **SLIDE.get(name, {}))
    with torch.no_grad():  # at init the stream is mostly the token's (and position's) embedding: let the context decide
        for table in (m.wte, getattr(m, "wpe", None)):
            if table is not None:
                table.weight.mul_(0.01)
    T, slides = m.config.block_size, hasattr(m.new_cache(1), "k")
    for prompt_len in (1, 2, 20):  # a one-token prompt takes the single-step path from the start; 20 > block_size
        prompt = torch.randint(0, 61, (2, prompt_len))
        seq = torch.cat([prompt, *m.generate(prompt, 40, temperature=0)], 1)  # (2, prompt_len + 40)
        w = min(prompt_len, T)
        for t in range(prompt_len, seq.size(1)):
            logits = m(seq[:, t - w:t] if slides else seq[:, :t])[0][:, -1]  # (2, V)
            chosen = logits.gather(1, seq[:, t:t + 1])[:, 0]  # an argmax, up to the rounding of another path
            assert (chosen >= logits.max(-1).values - 1e-5).all(), (prompt_len, t)
            w = T // 2 if w == T else w + 1
        sampled = torch.cat([prompt, *m.generate(prompt, 40, temperature=1.0, top_k=1, top_p=0.9)], 1)
        assert torch.equal(sampled, seq)  # sampling among the top 1 is greedy


OVERFIT = {"transformer": (dict(), 3e-3), "moe": (dict(n_expert=4, top_k=2), 3e-3), "mamba": (dict(), 1e-2),
           "hybrid": (dict(), 3e-3)}


@pytest.mark.parametrize("name", MODELS)
def test_tiny_batch_overfits(name):
    kw, lr = OVERFIT.get(name, (dict(), 3e-3))
    torch.manual_seed(0)
    assert overfit(tiny(name, **kw).train(), lr=lr) < 0.1


GROUPS = {  # biases and norm weights, and a weight used twice (a tied head, Zamba's shared block)
    "transformer": [dict(bias=True, norm="layernorm", pos="learned"), dict(init="gpt2", tie_embeddings=True)],
    "moe": [dict(bias=True, norm="layernorm", n_shared=1), dict(tie_embeddings=True)],
    "mamba": [dict(bias=True), dict(tie_embeddings=True)],
    "hybrid": [dict(bias=True, layers="Md Me Md Me Ad Me Md S"), dict(layers="Md S Ae S", tie_embeddings=True)],
}


@pytest.mark.parametrize("name", MODELS)
def test_optimizer_groups_hold_every_parameter_once(name):
    for kw in GROUPS.get(name, [dict()]):
        m = tiny(name, **kw)
        decay, keep = m.optim_groups(0.1)
        assert decay["weight_decay"] == 0.1 and keep["weight_decay"] == 0.0
        grouped = [id(p) for p in [*decay["params"], *keep["params"]]]
        assert len(grouped) == len(set(grouped)) == len(list(m.parameters())), kw  # a shared weight counted once
        assert set(grouped) == {id(p) for p in m.parameters()}, kw


E2E = {  # train.py options, and what train.py must print about the model
    "transformer": ([*TINY_ARGS], []),
    "moe": ([*TINY_ARGS, "--model=moe", "--n_expert=4"], ["active)", "top-2 of 4 experts"]),
    "mamba": (train_args("mamba"), ["Mamba layers"]),
    "hybrid": ([*TINY_ARGS[1:], "--model=hybrid", "--layers=Md Ae", "--n_expert=4"],
               ["architecture: layers Md Ae (A attention, M Mamba"]),
}


@pytest.mark.parametrize("name", MODELS)
def test_train_and_sample_end_to_end(name, tmp_path, data_dir):
    out = tmp_path / "out"
    args, says = E2E.get(name, (train_args(name), []))
    r = run("train.py", *args, "--max_iters=30", "--eval_interval=15", "--log_interval=10",
            f"--out_dir={out}", f"--data_dir={data_dir}")
    assert r.returncode == 0, r.stderr
    for text in ("parameters", "MFLOPs per token", "tokens per parameter (Chinchilla-optimal: ~20)",
                 "eval 30 | train", "ms/iter", "tok/s", "eta", "| grad_norm ", *says):
        assert text in r.stdout, text
    if name in ("moe", "hybrid"):  # the expert statistics on every eval line
        evals = [l for l in r.stdout.splitlines() if l.startswith("eval ")]
        assert len(evals) == 3 and all("moe_ent" in l and "moe_vio" in l and "moe_dead" in l for l in evals)
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in rows if "val_loss" in r] == [0, 15, 30]
    assert rows[-1]["val_loss"] < rows[0]["val_loss"]
    steps = [r for r in rows if "loss" in r]
    assert len(steps) == 30 and all(math.isfinite(r["grad_norm"]) and r["grad_norm"] > 0 for r in steps)
    parts = {"ce_loss", "balance_loss", "z_loss"} if name in ("moe", "hybrid") else {"ce_loss"}  # the model's aux, logged
    assert all({k for k in r if k.endswith("_loss")} == parts for r in steps)
    assert all(r["ce_loss"] <= r["loss"] < r["ce_loss"] + 0.1 for r in steps)  # the auxiliary losses are small
    svg = ET.parse(out / "loss.svg").getroot()  # valid XML, one line per series, each named
    lines = svg.findall("{http://www.w3.org/2000/svg}polyline")
    assert len(lines) == 2 and [len(l.get("points").split()) for l in lines] == [30, 3]
    assert {"train", "val"} <= {t.text for t in svg.iter("{http://www.w3.org/2000/svg}text")}
    # 40 new tokens: past block_size, through the KV cache's sliding window or the fixed-size state
    s = run("sample.py", f"--ckpt={out}/ckpt_best.pt", "--prompt=def ", "--max_new_tokens=40", "--num_samples=2", "--device=cpu")
    assert s.returncode == 0, s.stderr
    assert s.stdout.count("def ") >= 2 and "tokens/s" in s.stderr and f"({name}, " in s.stderr


# ----------------------------------------------------------------------------- attention
# The explicit formula against the fast path, MHA/GQA/MQA head counts (the KV cache: the contract)

def loss_and_grads(m, idx, targets, names):
    """The loss and the gradients of the named parameters, on one batch."""
    loss = m(idx, targets)[1]
    params = dict(m.named_parameters())
    return [loss, *torch.autograd.grad(loss, [params[n] for n in names])]


def assert_same_loss_and_grads(fast, slow):
    """Two paths of one model (slow takes fast's weights): the same loss and gradients on one batch."""
    slow.load_state_dict(fast.state_dict())
    idx, targets, names = torch.randint(0, 61, (2, 23)), torch.randint(0, 61, (2, 23)), [n for n, _ in fast.named_parameters()]
    for a, b in zip(*(loss_and_grads(m, idx, targets, names) for m in (fast, slow))):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("variant", [dict(pos="alibi", n_kv_head=2), dict(pos="rope", n_kv_head=1),
                                     dict(pos="alibi", attn_scale="one"), dict(pos="rope", n_kv_head=1, attn_scale="dim")], ids=ID)
def test_explicit_attention_equals_fast_path(variant):
    assert_same_loss_and_grads(tiny_transformer(**variant, flash=True), tiny_transformer(**variant, flash=False))


@pytest.mark.parametrize("name, flash", [("transformer", True), ("transformer", False), ("moe", True), ("hybrid", True)])
@pytest.mark.parametrize("attn_scale", ["sqrt", "one", "dim"])
def test_attn_scale_reaches_the_softmax(name, flash, attn_scale):
    """Scores q.k times the scale, against scores of q times the scale (its rows of qkv scaled) at attn_scale=one:
    the same logits. Fails if the flag is ignored or the scale is not 1/sqrt(D), 1 or 1/D."""
    kw = dict(layers="Ad Md") if name == "hybrid" else dict(flash=flash)
    m, ref = tiny(name, attn_scale=attn_scale, **kw), tiny(name, attn_scale="one", **kw)
    D, H = m.config.head_dim, m.config.n_head
    scale = {"sqrt": 1 / math.sqrt(D), "one": 1.0, "dim": 1 / D}[attn_scale]
    state = m.state_dict()
    for k in state:
        if k.endswith("qkv.weight"):
            state[k] = torch.cat((state[k][:H * D] * scale, state[k][H * D:]))  # the query heads' rows come first
    ref.load_state_dict(state)
    idx = torch.randint(0, 61, (2, 30))
    torch.testing.assert_close(m(idx)[0], ref(idx)[0], atol=1e-5, rtol=1e-5)


CONFIG_ERRORS = [  # (model, impossible fields, the one-line message)
    ("transformer", dict(n_head=6, n_kv_head=4), "divisible by n_kv_head"), ("transformer", dict(d_model=50), "divisible by n_head"),
    ("transformer", dict(n_layer=0), "n_layer must be positive"), ("transformer", dict(pos="xpos"), "pos must be one of"),
    ("transformer", dict(d_model=36, n_kv_head=2), "even head dim"), ("transformer", dict(init="xavier"), "init must be one of"),
    ("transformer", dict(rope_scaling="linear"), "rope_scaling must be one of"), ("transformer", dict(rope_factor=0.0), "rope_factor"),
    ("mamba", dict(n_layer=0), "n_layer must be positive"), ("mamba", dict(dt_min=0.2, dt_max=0.1), "dt_min <= dt_max"),
    ("mamba", dict(scan="fft"), "scan must be one of"), ("mamba", dict(dt_rank=-1), "dt_rank must be positive"),
    ("mamba", dict(selective="b"), "selective must be one of"),
    ("moe", dict(top_k=9), "top_k must be between 1 and n_expert"), ("moe", dict(router="hash"), "router must be one of"),
    ("moe", dict(d_expert=20), "divisible by 8"), ("moe", dict(moe_every=2, moe_offset=2), "moe_offset < moe_every"),
    ("hybrid", dict(layers="Md Xq"), "'Xq' is not a layer"), ("hybrid", dict(layers="Sd"), "'Sd' is not a layer"),
    ("hybrid", dict(layers=" "), "no layers"), ("hybrid", dict(top_k=9), "top_k must be between"),
    ("hybrid", dict(n_head=6), "divisible"), ("hybrid", dict(scan="fast"), "scan must be one of"),
    ("hybrid", dict(dt_min=0.2, dt_max=0.1), "dt_min <= dt_max"),
    ("transformer", dict(attn_scale="half"), "attn_scale must be one of"), ("hybrid", dict(attn_scale="1"), "attn_scale must be one of"),
]


@pytest.mark.parametrize("name, kw, msg", CONFIG_ERRORS, ids=[f"{n}-{ID(kw)}" for n, kw, _ in CONFIG_ERRORS])
def test_config_rejects_impossible_values(name, kw, msg):
    with pytest.raises(ValueError, match=msg):
        tiny_config(name, **kw)


# ----------------------------------------------------------------------------- positions
# Sinusoidal on the embeddings' scale, RoPE and its PI/NTK scaling (ALiBi, learned, none: the contract's VARIANTS)

def sinusoid_table(T, C):
    """Vaswani et al. written out: PE(pos, 2i) = sin(pos / 10000^(2i/C)), PE(pos, 2i+1) = cos(pos / 10000^(2i/C))."""
    pos, i = torch.arange(T, dtype=torch.float64)[:, None], torch.arange(C // 2, dtype=torch.float64)[None, :]
    angle = pos / 10000 ** (2 * i / C)  # (T, C/2)
    return torch.stack([angle.sin(), angle.cos()], -1).view(T, C)  # (T, C/2, 2) -> (T, C): sin, cos interleaved


# ALiBi (Press et al.): head h of n has slope 2^(-8h/n), h = 1..n, for n a power of two; otherwise the slopes
# of the power of two below n, then every other slope of the one above. n -> the exponents e of 2^-e
ALIBI_SLOPES = {4: [2, 4, 6, 8], 8: [1, 2, 3, 4, 5, 6, 7, 8], 6: [2, 4, 6, 8, 1, 3],
                12: [1, 2, 3, 4, 5, 6, 7, 8, 0.5, 1.5, 2.5, 3.5]}


def test_sinusoids_and_alibi_slopes_have_their_closed_forms():
    for module in (model_transformer, model_moe):
        # float32 angles up to 40, whose ulp is 3.8e-6
        torch.testing.assert_close(module.sinusoids(40, 48).double(), sinusoid_table(40, 48), atol=4e-6, rtol=0)
        for n, exponents in ALIBI_SLOPES.items():
            assert torch.equal(module.alibi_slopes(n), torch.tensor([2.0 ** -e for e in exponents])), n
    m = tiny_transformer(pos="alibi", n_head=6, n_kv_head=2)
    assert torch.equal(m.blocks[1].attn.alibi, torch.tensor([2.0 ** -e for e in ALIBI_SLOPES[6]]))


def test_sinusoidal_table_is_on_the_token_embeddings_scale():
    """Amplitude 1 against embeddings of std 0.02 drowns the tokens: the table is scaled to their RMS."""
    for init in ("fan_in", "gpt2"):
        m = tiny_transformer(pos="sinusoidal", init=init)
        table_rms = m.sinusoids.pow(2).mean().sqrt().item()
        token_rms = m.wte.weight.pow(2).mean().sqrt().item()
        assert 0.8 < table_rms / token_rms < 1.25, init
        # the closed form (of RMS 1/sqrt(2): sin^2 + cos^2 = 1), only scaled
        torch.testing.assert_close(m.sinusoids.double() / (2 ** 0.5 * table_rms), sinusoid_table(40, 48), atol=4e-6, rtol=0)


def test_rope_scaling_none_is_plain_rope_and_pi_divides_positions():
    D, theta, s = 12, 10000.0, 4.0
    plain = tiny_transformer(n_head=4)  # head dim 48 / 4 = 12
    pos = torch.arange(40)
    angle = pos[:, None].double() * theta ** (-torch.arange(0, D, 2).double() / D)  # the formula of Su et al.
    cos, sin = plain.rope(pos)
    torch.testing.assert_close(cos[:, 0].double(), angle.cos(), atol=1e-5, rtol=0)
    torch.testing.assert_close(sin[:, 0].double(), angle.sin(), atol=1e-5, rtol=0)
    pi = tiny_transformer(rope_scaling="pi", rope_factor=s)
    for got, want in zip(pi.rope(pos), plain.rope(pos / s)):  # PI at factor s = RoPE at positions / s
        torch.testing.assert_close(got, want, atol=0, rtol=0)
    ntk = tiny_transformer(rope_scaling="ntk", rope_factor=s)
    assert ntk.inv_freq[0] == plain.inv_freq[0]  # the fastest rotation as trained
    torch.testing.assert_close(ntk.inv_freq[-1], plain.inv_freq[-1] / s)  # the slowest s times slower
    idx = torch.randint(0, 61, (2, 40))
    for scaling in ("pi", "ntk"):  # factor 1 changes nothing
        same = tiny_transformer(rope_scaling=scaling, rope_factor=1.0)
        torch.testing.assert_close(same(idx)[0], plain(idx)[0], atol=0, rtol=0)


def test_yarn_is_ntk_by_parts_with_a_temperature():
    """Peng et al.'s closed forms: a pair making r = L / wavelength turns within the trained length L keeps its
    frequency when r > 32, is divided by the factor s when r < 1 (as PI), and between takes the linear ramp
    gamma = (r - 1) / 31 of the two; q and k are scaled by 0.1 ln(s) + 1. At factor 1: plain RoPE."""
    D, s, L = 12, 4.0, 1024  # head dim 48 / 4; turns: 163, 35 (kept), 7.6, 1.6 (ramp), 0.35, 0.08 (divided by s)
    plain, yarn = (tiny_transformer(block_size=int(s * L), rope_scaling=k, rope_factor=f) for k, f in (("none", 1.0), ("yarn", s)))
    freq = 10000.0 ** (-torch.arange(0, D, 2).double() / D)
    turns = L * freq / (2 * math.pi)
    gamma = ((turns - 1) / 31).clamp(0, 1)
    assert (turns > 32).sum() == 2 and (turns < 1).sum() == 2  # each regime present
    torch.testing.assert_close(yarn.inv_freq[turns > 32], plain.inv_freq[turns > 32], atol=0, rtol=0)
    torch.testing.assert_close(yarn.inv_freq[turns < 1].double(), freq[turns < 1] / s)
    torch.testing.assert_close(yarn.inv_freq.double(), (1 - gamma) * freq / s + gamma * freq)
    cos, sin = yarn.rope(torch.arange(100))
    torch.testing.assert_close(cos ** 2 + sin ** 2, torch.full_like(cos, (0.1 * math.log(s) + 1) ** 2))  # 1.1386^2
    torch.testing.assert_close(cos[0, 0], torch.full((D // 2,), 1.1386294))
    same = tiny_transformer(block_size=int(s * L), rope_scaling="yarn", rope_factor=1.0)
    idx = torch.randint(0, 61, (2, 40))
    torch.testing.assert_close(same(idx)[0], plain(idx)[0])


@pytest.mark.parametrize("module", [model_transformer, model_moe], ids=["transformer", "moe"])
def test_rope_scaled_model_runs_at_4x_the_trained_length(module):
    torch.manual_seed(0)
    shape = dict(vocab_size=61, d_model=32, n_layer=2, n_head=4, **(dict(n_expert=4) if module is model_moe else {}))
    trained = module.Model(module.Config(**shape, block_size=16)).eval()
    idx = torch.randint(0, 61, (2, 64))
    first = trained(idx[:, :16])[0]
    for scaling in ("none", "pi", "ntk", "yarn"):
        long = module.Model(module.Config(**shape, block_size=64, rope_scaling=scaling, rope_factor=4.0)).eval()
        long.load_state_dict(trained.state_dict())  # no new weights: scaling is applied at evaluation
        logits, loss = long(idx, idx)
        assert logits.shape == (2, 64, 61) and torch.isfinite(loss)
        if scaling == "none":  # causal, same angles: the first 16 positions are the trained model's
            torch.testing.assert_close(logits[:, :16], first)


# ----------------------------------------------------------------------------- feed-forward and norms
# SwiGLU at a GELU MLP's parameter count, the original ReLU MLP (norms, pre/post: the contract's VARIANTS)

def test_swiglu_matches_gelu_parameter_count():
    gelu = tiny_transformer(ffn="gelu", d_model=96).num_params()
    swiglu = tiny_transformer(ffn="swiglu", d_model=96).num_params()
    assert abs(swiglu - gelu) / gelu < 0.01


def test_relu_ffn_is_the_original_transformers():
    m = tiny_transformer(ffn="relu", pos="learned", norm="layernorm")
    mlp = m.blocks[0].ffn
    assert isinstance(mlp, model_transformer.MLP) and m.config.d_ff == 4 * m.config.d_model
    x = torch.randn(2, 5, 48)
    torch.testing.assert_close(mlp(x), mlp.out_proj(F.relu(mlp.fc(x))), atol=0, rtol=0)
    assert m.num_params() == tiny_transformer(ffn="gelu", pos="learned", norm="layernorm").num_params()
    moe = model_moe.Model(model_moe.Config(vocab_size=61, block_size=40, d_model=48, n_layer=2, n_head=4, ffn="relu",
                                           n_expert=4))
    h = torch.randn(7, moe.config.d_expert)
    torch.testing.assert_close(moe.blocks[0].ffn.act(h), F.relu(h), atol=0, rtol=0)


# ----------------------------------------------------------------------------- initialisation
# PyTorch's fan_in and GPT-2's init of the Transformer and the MoE experts, the initial loss they give

def test_shapes_and_initial_loss():
    m = tiny_transformer()
    idx, targets = torch.randint(0, 61, (3, 17)), torch.randint(0, 61, (3, 17))
    logits, loss = m(idx, targets)
    assert logits.shape == (3, 17, 61) and logits.dtype == torch.float32
    # the head's U(+-1/sqrt(C)) on a normalised stream gives logits of std 1/sqrt(3): loss ~ log V + 1/6
    assert abs(loss.item() - (math.log(61) + 1 / 6)) < 0.1


def test_init_and_optimizer_groups():
    m = tiny_transformer(n_layer=8, d_model=192, n_head=4, bias=True, norm="layernorm", pos="learned")
    p = dict(m.named_parameters())
    # fan_in, PyTorch's defaults: every matrix U(+-1/sqrt(fan_in)), i.e. bound sqrt(fan_in) * max ~ 1 and
    # std sqrt(3 * fan_in) * std ~ 1, whatever the width; no extra depth scaling
    for name, fan_in in (("blocks.0.attn.qkv.weight", 192), ("blocks.0.ffn.gate_up.weight", 192),
                         ("blocks.0.attn.out_proj.weight", 192), ("blocks.0.ffn.out_proj.weight", m.config.d_ff),
                         ("lm_head.weight", 192)):
        assert 0.97 < p[name].abs().max().item() * math.sqrt(fan_in) <= 1, name
        assert abs(p[name].std().item() * math.sqrt(3 * fan_in) - 1) < 0.03, name
    assert abs(p["wte.weight"].std().item() - 1) < 0.05 and abs(p["wpe.weight"].std().item() - 1) < 0.05
    assert m.lm_head.weight is not m.wte.weight  # untied: a unit-scale embedding, a 1/sqrt(d_model) readout
    assert all(not p[n].any() for n in p if n.endswith(".bias"))
    gpt2 = tiny_transformer(n_layer=8, d_model=192, init="gpt2", tie_embeddings=True, bias=True)
    q = dict(gpt2.named_parameters())
    assert abs(q["blocks.0.attn.qkv.weight"].std().item() - 0.02) < 0.002
    assert abs(q["blocks.0.attn.out_proj.weight"].std().item() - 0.02 / 4) < 0.0007  # scaled for depth
    assert abs(gpt2.wte.weight.std().item() - 0.02) < 0.002 and gpt2.lm_head.weight is gpt2.wte.weight
    assert all(not q[n].any() for n in q if n.endswith(".bias"))
    decay, keep = m.optim_groups(0.1)  # matrices decay, vectors (norms, biases) do not
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in keep["params"])


def test_moe_init_follows_the_transformer():
    """The experts' stacked matrices follow the rule of the dense feed-forward: fan_in by default, 0.02 under gpt2."""
    u = lambda fan_in: (3 * fan_in) ** -0.5  # the std of U(+-1/sqrt(fan_in))
    for init, w_in, w_out, router in (("fan_in", u(96), u(64), u(96)), ("gpt2", 0.02, 0.02 / 4, 0.02)):
        m = tiny_moe(n_layer=8, d_model=96, d_expert=64, n_expert=4, init=init)
        ffn = m.blocks[0].ffn
        assert abs(ffn.w_in.std().item() - w_in) < 0.05 * w_in and abs(ffn.w_out.std().item() - w_out) < 0.05 * w_out
        assert abs(ffn.router.weight.std().item() - router) < 0.1 * router


# ----------------------------------------------------------------------------- kernels: FlashAttention
# The Triton kernel (interpreted on the CPU) and the torch path against float64; full sizes on a GPU only

# Output and all three gradients against the float64 formula: the kernel's error within 2x that of
# PyTorch doing the same math at the input precision (the flash-attention project's rule), plus a
# floor of 16 float32 ulps of the largest value: another summation order and p = exp(s - lse)
# rebuilt from the row log-sum-exp measured up to ~11 ulps (200 fp32 runs); 4e-6 relative at most,
# ~1/500 of an fp16 ulp. On a GPU exp2, log2 and `/` are approximate (~2 ulps each): record_error
# logs error / floor per case (gpu_check.sh prints them), so the first GPU run shows the margin.
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


# (B, H, Hkv, Tq, Tk, D, causal, alibi, dtype): every listed feature and value at least once,
# not the full cross product (the interpreter is slow). Lengths 1, 17, 100, 257 (257 spans three
# query tiles of 128 and five key tiles of 64 with a ragged tail); head dims 16, 48 (padded to 64
# inside the kernel), 64, 128; MHA, GQA (groups of 2 and 3), MQA.
ATTENTION_CASES = [
    (2, 2, 2, 17, 17, 16, True, False, F32),  # MHA, short ragged tile
    (1, 4, 1, 257, 257, 64, True, True, F16),  # MQA + ALiBi, several tiles each way
    (2, 4, 2, 100, 100, 48, False, True, F16),  # GQA, non-causal, non-power-of-two head dim
    (4, 4, 2, 1, 1, 48, True, False, F16),  # a single token (B=4: enough elements for a stable max error)
    (1, 2, 1, 1, 100, 64, True, False, F32),  # decode: one query against a cache
    (1, 6, 2, 17, 257, 48, True, True, F32),  # chunked prefill, groups of 3, ALiBi
    (1, 2, 2, 100, 257, 16, False, False, F16),  # Tq < Tk without the causal mask
    # More queries than keys (a cross-attention shape), without ALiBi: here the first queries sit up
    # to 257 positions before every key, so with ALiBi all their scores are ~-100 and rebuilding
    # p = exp(s - lse) in the backward from such large numbers costs float32 digits (dq measured at
    # up to 2.3x PyTorch's error). Causal or self-attention rows always have a key at distance 0.
    (1, 4, 4, 257, 100, 64, False, False, F32),
    (1, 2, 1, 130, 130, 128, True, True, F16),  # largest head dim; second query tile has full key tiles
    # bf16: under the interpreter the tiles are upcast after loading, so this checks the wiring;
    # the GPU run (gpu_check.sh) checks bf16 arithmetic itself.
    (2, 4, 2, 100, 130, 48, True, True, BF16),
]


def record_error(quantity, err, bound, detail=""):
    """Appends one measured kernel error and the bound it is held to, as a line of
    $KERNEL_ERROR_LOG (gpu_check.sh sets it): the first run on a new GPU shows how close each
    bound is (the GPU's exp2, log2 and division are approximate where the interpreter used numpy's)."""
    path = os.environ.get("KERNEL_ERROR_LOG")
    if path:
        test = os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0]
        with open(path, "a") as f:
            f.write(f"{test}\t{quantity}\t{err:.3g}\t{bound:.3g}\t{err / bound if bound else float('inf'):.3f}\t{detail}\n")


def make_inputs(B, H, Hkv, Tq, Tk, D, alibi, dtype, device):
    q = torch.randn(B, H, Tq, D, device=device, dtype=dtype)
    k = torch.randn(B, Hkv, Tk, D, device=device, dtype=dtype)
    v = torch.randn(B, Hkv, Tk, D, device=device, dtype=dtype)
    do = torch.randn(B, H, Tq, D, device=device, dtype=dtype)
    slopes = torch.rand(H, device=device) * 0.5 + 0.05 if alibi else None  # in the range of the ALiBi paper's slopes
    return q, k, v, do, slopes


def run_with_grads(fn, q, k, v, do, **kw):
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    o = fn(q, k, v, **kw)
    return (o, *torch.autograd.grad(o, (q, k, v), do.to(o.dtype)))


def assert_close_to_float64(fn, q, k, v, do, causal, slopes):
    """fn's output and gradients against float64, held to 2x PyTorch's error at the input precision."""
    got = run_with_grads(fn, q, k, v, do, causal=causal, alibi_slopes=slopes)
    exact = run_with_grads(kernels.attention_ref, q.double(), k.double(), v.double(), do.double(),
                           causal=causal, alibi_slopes=slopes)
    same_precision = run_with_grads(kernels.attention_ref, q, k, v, do, causal=causal, alibi_slopes=slopes)
    ulp32 = torch.finfo(torch.float32).eps
    for name, a, ref, pt in zip(["out", "dq", "dk", "dv"], got, exact, same_precision):
        assert a.dtype == q.dtype and a.shape == ref.shape
        err = (a.double() - ref).abs().max().item()  # NaN (an unwritten element) fails below
        err_pt = (pt.double() - ref).abs().max().item()
        floor = 16 * ulp32 * max(1.0, ref.abs().max().item())
        record_error(name, err, 2 * err_pt + floor, f"2x PyTorch {2 * err_pt:.3g} + floor {floor:.3g}; "
                     f"error / floor {err / floor:.2f}")
        assert err <= 2 * err_pt + floor, f"{name}: error {err:.3g} > 2 x PyTorch's {err_pt:.3g} + {floor:.2g}"


@pytest.fixture
def poisoned(monkeypatch):
    """Every buffer a kernel writes starts as NaN, so an element it forgot to write fails."""
    monkeypatch.setattr(kernels, "OUTPUT_FILL", float("nan"))


@needs_triton
@pytest.mark.parametrize("B,H,Hkv,Tq,Tk,D,causal,alibi,dtype", ATTENTION_CASES)
def test_attention_triton_matches_float64(B, H, Hkv, Tq, Tk, D, causal, alibi, dtype, poisoned):
    q, k, v, do, slopes = make_inputs(B, H, Hkv, Tq, Tk, D, alibi, dtype, TRITON_DEVICE)
    assert_close_to_float64(lambda *a, **kw: kernels.attention(*a, impl="triton", **kw), q, k, v, do, causal, slopes)


@needs_triton
@pytest.mark.parametrize("causal,alibi,Tq,Tk", [(True, True, 17, 100), (False, False, 100, 100)])
def test_attention_triton_keeps_row_logsumexp(causal, alibi, Tq, Tk, poisoned):
    B, H, Hkv, D = 1, 4, 2, 48
    q, k, v, _, slopes = make_inputs(B, H, Hkv, Tq, Tk, D, alibi, F32, TRITON_DEVICE)
    o, lse = kernels._flash_forward(q, k, v, causal, slopes, 1 / math.sqrt(D))
    kd = k.double().repeat_interleave(H // Hkv, dim=1)  # (B, H, Tk, D)
    s = q.double() @ kd.transpose(-2, -1) / math.sqrt(D)  # (B, H, Tq, Tk)
    i, j = torch.arange(Tk - Tq, Tk, device=s.device)[:, None], torch.arange(Tk, device=s.device)[None, :]
    if alibi:
        s = s - slopes.double().view(H, 1, 1) * (i - j).abs()
    if causal:
        s = s.masked_fill(j > i, float("-inf"))
    assert lse.shape == (B, H, Tq) and lse.dtype == torch.float32
    assert (lse.double() - s.logsumexp(-1)).abs().max().item() < 1e-5  # fp32 rounding of values ~log(Tk)


@needs_triton
def test_attention_triton_under_other_launch_settings(monkeypatch, poisoned):
    """KERNEL_CONFIG (the GPU sweep's knob) changes tiles, not results: tiles smaller than the
    defaults and unequal, so the masked tails and the causal tile bounds fall elsewhere."""
    monkeypatch.setenv("KERNEL_CONFIG", "fwd=16,32,2,1 dkdv=32,16,2,1 dq=16,32,2,1")
    q, k, v, do, slopes = make_inputs(1, 4, 2, 45, 77, 24, True, F32, TRITON_DEVICE)
    assert_close_to_float64(lambda *a, **kw: kernels.attention(*a, impl="triton", **kw), q, k, v, do, True, slopes)


@pytest.mark.parametrize("B,H,Hkv,Tq,Tk,D,causal,alibi,dtype", [
    (2, 4, 2, 100, 100, 48, True, False, F32),  # SDPA's own is_causal
    (1, 4, 1, 17, 257, 64, True, True, F32),  # explicit mask: causal aligned to the end + ALiBi
    (8, 8, 2, 1, 100, 64, True, False, F16),  # decode step (enough elements for a stable max error)
    (1, 6, 2, 100, 257, 48, False, True, F16),  # non-causal ALiBi, GQA
])
def test_attention_torch_path_matches_float64(B, H, Hkv, Tq, Tk, D, causal, alibi, dtype):
    q, k, v, do, slopes = make_inputs(B, H, Hkv, Tq, Tk, D, alibi, dtype, "cpu")
    assert_close_to_float64(lambda *a, **kw: kernels.attention(*a, impl="torch", **kw), q, k, v, do, causal, slopes)


@needs_triton
def test_attention_triton_follows_autocast_and_mixed_dtypes():
    q, k, v, do, slopes = make_inputs(1, 4, 2, 17, 40, 16, True, F32, TRITON_DEVICE)
    with torch.autocast(TRITON_DEVICE, dtype=torch.bfloat16):
        o, dq, dk, dv = run_with_grads(lambda *a, **kw: kernels.attention(*a, impl="triton", **kw), q, k, v, do,
                                       causal=True, alibi_slopes=slopes)
    assert o.dtype == BF16 and dq.dtype == dk.dtype == dv.dtype == F32  # gradients come back in the leaves' dtype
    ref = kernels.attention_ref(q.double(), k.double(), v.double(), alibi_slopes=slopes)
    assert (o.double() - ref).abs().max() < 0.05  # bf16 inputs: about 3 significant digits
    o16 = kernels.attention(q.half(), k, v, impl="triton")  # float32 K/V (a cache) with fp16 queries
    ref16 = kernels.attention_ref(q.double(), k.double(), v.double())
    assert o16.dtype == F16 and (o16.double() - ref16).abs().max() < 0.01


def test_attention_dispatch_and_errors():
    q, k, v, _, _ = make_inputs(1, 4, 2, 9, 9, 16, False, F32, "cpu")
    assert torch.equal(kernels.attention(q, k, v), kernels.attention(q, k, v, impl="torch"))  # CPU -> torch
    with pytest.raises(ValueError, match="Tq=9 <= Tk=5"):
        kernels.attention(q, k[:, :, :5], v[:, :, :5])
    with pytest.raises(ValueError, match="multiple"):
        kernels.attention(q, k[:, :1].expand(1, 3, 9, 16), v[:, :1].expand(1, 3, 9, 16))


def test_triton_dispatch_leaves_float64_to_torch(monkeypatch):
    monkeypatch.setattr(kernels, "TRITON_DEVICES", {"cuda", "cpu"})  # the CPU as a GPU; Triton runs in the interpreter
    flash, scans = [], []
    real_flash, real_triton, real_chunked = kernels.FlashAttention.apply, kernels.selective_scan_triton, kernels.selective_scan_chunked
    monkeypatch.setattr(kernels.FlashAttention, "apply", lambda *a: (flash.append(a[0].dtype), real_flash(*a))[1])
    monkeypatch.setattr(kernels, "selective_scan_triton", lambda *a: (scans.append("triton"), real_triton(*a))[1])
    monkeypatch.setattr(kernels, "selective_scan_chunked", lambda *a: (scans.append("chunked"), real_chunked(*a))[1])
    q, k, v, _, slopes = make_inputs(1, 4, 2, 9, 9, 16, True, F32, "cpu")
    kernels.attention(q, k, v, alibi_slopes=slopes)
    q, k, v = q.double(), k.double(), v.double()
    assert torch.equal(kernels.attention(q, k, v, alibi_slopes=slopes), kernels.attention(q, k, v, alibi_slopes=slopes, impl="torch"))
    assert flash == [F32]  # the float32 call took the kernel, the float64 one did not
    args = {k: v.detach() for k, v in scan_inputs(L=5).items()}
    kernels.selective_scan(**args)
    kernels.selective_scan(**{k: v.double() for k, v in args.items()})
    assert scans == ["triton", "chunked"]
    with pytest.raises(ValueError, match="float32"):
        kernels.attention(q, k, v, impl="triton")
    with pytest.raises(ValueError, match="float32"):
        real_triton(**{k: v.double() for k, v in args.items()})


def test_attention_torch_path_alibi_mask_keeps_sdpa_on_its_flash_kernel(monkeypatch):
    """torch's CPU flash kernel takes 2-D and 4-D float masks; a 3-D (H, Tq, Tk) one sends SDPA to
    its math path, which stores the scores and probabilities (several (B, H, Tq, Tk) matrices)."""
    from torch.nn.attention import SDPBackend
    masks, real = [], F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **kw: (masks.append(kw["attn_mask"]), real(*a, **kw))[1])
    for Tq, alibi in [(20, True), (7, True), (7, False)]:  # Tq < Tk: the causal diagonal needs a mask too
        q, k, v, _, slopes = make_inputs(1, 4, 2, Tq, 20, 16, alibi, F32, "cpu")
        kernels.attention(q, k, v, causal=True, alibi_slopes=slopes, impl="torch")
        mask = masks[-1]
        assert mask.shape == ((1, 4, Tq, 20) if alibi else (Tq, 20))
        assert torch._fused_sdp_choice(q, k, v, mask, 0.0, False, enable_gqa=True) == int(SDPBackend.FLASH_ATTENTION)


TRITON_MODELS = {"transformer": dict(n_layer=1, pos="alibi", n_kv_head=2), "moe": dict(n_layer=1, n_kv_head=1),
                 "mamba": dict(n_layer=1), "hybrid": dict(layers="Md Ae")}  # one layer of each kind: the interpreter is slow


@needs_triton
@pytest.mark.parametrize("name", MODELS)
def test_models_through_the_triton_kernels(name, monkeypatch, poisoned):
    """Each model on the dispatch a GPU takes (the Triton attention and scan, interpreted on the CPU)
    against torch's paths: the same loss and gradients, and the same greedy tokens through the cache.
    Inside a model q, k and v are views of one projection and the KV cache has its own buffers."""
    m = tiny(name, **TRITON_MODELS.get(name, {})).to(TRITON_DEVICE)
    idx, targets, prompt = (torch.randint(0, 61, shape, device=TRITON_DEVICE) for shape in ((2, 13), (2, 13), (2, 5)))
    names = [n for n, _ in m.named_parameters()]
    calls, flash, scan = [], kernels.FlashAttention.apply, kernels.selective_scan_triton
    monkeypatch.setattr(kernels.FlashAttention, "apply", lambda *a: calls.append("flash") or flash(*a))
    monkeypatch.setattr(kernels, "selective_scan_triton", lambda *a, **kw: calls.append("scan") or scan(*a, **kw))
    results = []
    for devices in (set(), {TRITON_DEVICE}):  # torch's paths, then Triton's
        monkeypatch.setattr(kernels, "TRITON_DEVICES", devices)
        results.append([*loss_and_grads(m, idx, targets, names), torch.cat(list(m.generate(prompt, 6, temperature=0)), 1)])
    assert set(calls) == ({"scan"} if name == "mamba" else {"flash", "scan"} if name == "hybrid" else {"flash"})
    for n, a, b in zip(["loss", *names], *results):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4, msg=n)
    assert torch.equal(*[r[-1] for r in results]), "greedy tokens"


# On a GPU only (gpu_check.sh): bf16, sizes at which the fast unmasked loop dominates, determinism.
@needs_gpu
@pytest.mark.parametrize("B,H,Hkv,Tq,Tk,D,causal,alibi,dtype", [
    (2, 4, 2, 257, 257, 64, True, True, BF16),
    (1, 4, 1, 17, 300, 48, True, False, BF16),
    (2, 4, 4, 100, 100, 128, False, True, BF16),
    (4, 12, 12, 1024, 1024, 64, True, False, BF16),  # the nanoGPT shape
    (2, 8, 2, 1024, 1024, 64, True, True, F16),
    (1, 8, 2, 4096, 4096, 128, True, False, BF16),
    (1, 8, 8, 2048, 2048, 128, False, False, F16),
    (2, 8, 1, 500, 1500, 96, True, True, BF16),
    (1, 4, 2, 1000, 1000, 80, False, True, F32),
])
def test_attention_triton_gpu_full_size(B, H, Hkv, Tq, Tk, D, causal, alibi, dtype, poisoned):
    q, k, v, do, slopes = make_inputs(B, H, Hkv, Tq, Tk, D, alibi, dtype, "cuda")
    assert_close_to_float64(lambda *a, **kw: kernels.attention(*a, impl="triton", **kw), q, k, v, do, causal, slopes)


@needs_gpu
def test_attention_triton_backward_is_deterministic():
    q, k, v, do, slopes = make_inputs(2, 8, 2, 1024, 1024, 64, True, BF16, "cuda")
    first = run_with_grads(kernels.attention, q, k, v, do, causal=True, alibi_slopes=slopes)
    for _ in range(50):
        again = run_with_grads(kernels.attention, q, k, v, do, causal=True, alibi_slopes=slopes)
        for name, a, b in zip(["out", "dq", "dk", "dv"], first, again):
            assert torch.equal(a, b), f"{name} differs between runs"


# ----------------------------------------------------------------------------- Mamba
# The loop scan, the chunked scan, the Triton scan and the state update against the reference; the model

def scan_inputs(Bsz=2, Dm=5, N=3, L=7, strong=False, dtype=torch.float32, seed=0):
    """Random inputs for every argument of selective_scan, all requiring grad. Dm = 5 is not a
    multiple of any block; strong=True makes dt A sum to thousands over the sequence."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)
    A = -(torch.rand(Dm, N, generator=g, dtype=dtype) * 50 + 50) if strong else -torch.rand(Dm, N, generator=g, dtype=dtype) * 3
    bias = r(Dm) + (4.0 if strong else 0.0)  # softplus(~4) ~ 4: each step decays by exp(-200) or more
    args = dict(u=r(Bsz, Dm, L), delta=r(Bsz, Dm, L), A=A, B=r(Bsz, N, L), C=r(Bsz, N, L), D=r(Dm),
                z=r(Bsz, Dm, L), delta_bias=bias, initial_state=r(Bsz, Dm, N))
    return {k: v.requires_grad_() for k, v in args.items()}


def run_scan(fn, args, **kw):
    """Output, last state and the gradient of a random projection of both w.r.t. every input."""
    out, last = fn(**args, return_last_state=True, **kw)
    g = torch.Generator().manual_seed(1)
    loss = (out * torch.randn(out.shape, generator=g, dtype=out.dtype)).sum() \
        + (last * torch.randn(last.shape, generator=g, dtype=last.dtype)).sum()
    names = [k for k, v in args.items() if v is not None]
    grads = torch.autograd.grad(loss, [args[k] for k in names])
    return {"out": out, "last": last, **{"d" + k: v for k, v in zip(names, grads)}}


def assert_same(got, want, atol=1e-5, rtol=1e-4):
    assert got.keys() == want.keys()
    for k in want:
        assert torch.isfinite(got[k]).all(), k
        torch.testing.assert_close(got[k], want[k], atol=atol, rtol=rtol, msg=lambda m: f"{k}: {m}")


@pytest.mark.parametrize("T", [1, 7, 65])
def test_mamba_loop_scan_equals_the_kernel(T):
    """selective_scan_loop, the recurrence written out in the model file, against kernels.selective_scan:
    outputs, last states and the gradients of every input, from a given state and from zeros."""
    torch.manual_seed(T)
    Bsz, E, N = 2, 6, 5
    x, dt, z = torch.randn(Bsz, E, T), torch.randn(Bsz, E, T), torch.randn(Bsz, E, T)
    A = -torch.rand(E, N) * 3 - 0.1
    Bm, Cm, D, bias, h0 = torch.randn(Bsz, N, T), torch.randn(Bsz, N, T), torch.randn(E), torch.randn(E), torch.randn(Bsz, E, N)
    for start in (h0, None):
        inputs = [t.clone().requires_grad_() for t in (x, dt, A, Bm, Cm, D, z, bias)]
        y, last = model_mamba.selective_scan_loop(*inputs, start)
        y_ref, last_ref = kernels.selective_scan(*inputs[:7], delta_bias=inputs[7], delta_softplus=True,
                                                 initial_state=start, return_last_state=True)
        torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(last, last_ref, atol=1e-5, rtol=1e-5)
        w, v = torch.randn_like(y), torch.randn_like(last)  # a random direction, so every output counts
        grads = [torch.autograd.grad((a * w).sum() + (b * v).sum(), inputs) for a, b in ((y, last), (y_ref, last_ref))]
        for name, g, g_ref in zip(("x", "dt", "A", "B", "C", "D", "z", "dt_bias"), *grads):
            torch.testing.assert_close(g, g_ref, atol=1e-4, rtol=1e-4, msg=name)


@pytest.mark.parametrize("L", [1, 7, 64, 127])
@pytest.mark.parametrize("chunk_size", [64, 5])
def test_chunked_scan_matches_reference(L, chunk_size):
    args = scan_inputs(L=L)
    assert_same(run_scan(kernels.selective_scan_chunked, args, chunk_size=chunk_size),
                run_scan(kernels.selective_scan_ref, args))


@pytest.mark.parametrize("L", [1, 7, 37])
def test_chunked_scan_with_transposed_inputs(L):
    """The layouts Mamba hands over: u contiguous (B, D, L); delta, z, B and C transposed views of
    (B, L, X) projections (z a slice of a wider one). The chunked scan copies each by its own route;
    results, and the layout of each gradient and of the output (z's), as with contiguous inputs."""
    args = scan_inputs(L=L, Bsz=3, Dm=6, N=4)
    wide = lambda t, extra=0: torch.cat((t.detach().transpose(1, 2), torch.zeros(*t.shape[:1], L, extra)), -1)
    views = {"delta": wide(args["delta"]), "z": wide(args["z"], 6), "B": wide(args["B"]), "C": wide(args["C"])}
    leaves = {k: v.requires_grad_() for k, v in views.items()}
    args_t = {**args, **{k: v[..., :args[k].size(1)].transpose(1, 2) for k, v in leaves.items()}}
    got = run_scan(kernels.selective_scan_chunked, args_t, chunk_size=5)
    assert_same(got, run_scan(kernels.selective_scan_ref, args))
    assert got["out"].transpose(1, 2).is_contiguous() and got["du"].is_contiguous()
    assert all(got["d" + k].transpose(1, 2).is_contiguous() for k in views)


@pytest.mark.parametrize("L", [1, 7, 64, 127])
def test_triton_scan_matches_reference(L, poisoned):  # under TRITON_INTERPRET=1 on the CPU
    args = scan_inputs(L=L)
    # 2 channel blocks (the second half empty), N = 3 padded to 4, checkpoints every 16 steps
    assert_same(run_scan(kernels.selective_scan_triton, args, block_d=4, ckpt=16),
                run_scan(kernels.selective_scan_ref, args))


def test_triton_scan_under_other_launch_settings(monkeypatch):
    monkeypatch.setenv("KERNEL_CONFIG", "scan=2,3,2")  # block_d, ckpt (not a power of two), warps
    args = scan_inputs(L=10)
    assert_same(run_scan(kernels.selective_scan, args, impl="triton"), run_scan(kernels.selective_scan_ref, args))


@pytest.mark.parametrize("impl", ["chunked", "triton"])
def test_scan_without_optional_inputs(impl, poisoned):
    args = scan_inputs(L=9)
    for k in ("D", "z", "delta_bias", "initial_state"):
        args[k] = None
    assert_same(run_scan(kernels.selective_scan, args, impl=impl), run_scan(kernels.selective_scan_ref, args))


@pytest.mark.parametrize("impl", ["chunked", "triton"])
def test_scan_plain_step_size(impl, poisoned):
    """delta_softplus=False, no bias: dt is delta itself (positive here)."""
    args = scan_inputs(L=9)
    args["delta"] = (args["delta"].detach().abs() + 0.1).requires_grad_()
    args["delta_bias"] = None
    assert_same(run_scan(kernels.selective_scan, args, delta_softplus=False, impl=impl),
                run_scan(kernels.selective_scan_ref, args, delta_softplus=False))


@pytest.mark.parametrize("impl", ["chunked", "triton"])
def test_scan_under_strong_decay(impl, poisoned):
    args = scan_inputs(L=40, strong=True)
    dt = F.softplus(args["delta"] + args["delta_bias"][:, None])  # (B, D, L)
    assert (dt[:, :, :, None] * args["A"][None, :, None, :]).sum(2).abs().min() > 1000  # |sum dt A| huge
    kw = dict(block_d=4, ckpt=16) if impl == "triton" else dict(chunk_size=8)
    fn = kernels.selective_scan_triton if impl == "triton" else kernels.selective_scan_chunked
    assert_same(run_scan(fn, args, **kw), run_scan(kernels.selective_scan_ref, args))


def test_chunked_scan_float64_exact():
    args = scan_inputs(L=50, dtype=torch.float64)
    assert_same(run_scan(kernels.selective_scan_chunked, args, chunk_size=8),
                run_scan(kernels.selective_scan_ref, args), atol=1e-12, rtol=1e-10)


def test_triton_scan_bf16_inputs(poisoned):
    args = {k: v.detach().to(torch.bfloat16) if k in ("u", "delta", "z", "B", "C") else v.detach()
            for k, v in scan_inputs(L=20).items()}
    out, last = kernels.selective_scan_triton(**args, return_last_state=True, block_d=4, ckpt=8)
    want, want_last = kernels.selective_scan_ref(**args, return_last_state=True)  # same bf16 inputs, fp32 math
    assert out.dtype == torch.bfloat16 and last.dtype == torch.float32
    # both round an fp32 result to bf16; fp32 values a rounding error apart can land one bf16 ulp apart
    torch.testing.assert_close(out.float(), want.float(), atol=1e-5, rtol=2 ** -7)
    torch.testing.assert_close(last, want_last, atol=1e-5, rtol=1e-5)


def test_state_update_steps_equal_the_scan():
    args = {k: v.detach() for k, v in scan_inputs(L=6).items()}
    want, want_last = kernels.selective_scan_ref(**args, return_last_state=True)
    state, ys = args["initial_state"], []
    for t in range(6):
        y, state = kernels.selective_state_update(state, args["u"][..., t], args["delta"][..., t], args["A"],
                                                  args["B"][..., t], args["C"][..., t], args["D"], args["z"][..., t],
                                                  dt_bias=args["delta_bias"])
        ys.append(y)
    torch.testing.assert_close(torch.stack(ys, -1), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(state, want_last, atol=1e-5, rtol=1e-5)


def test_scan_dispatch_on_cpu_is_the_chunked_path():
    args = {k: v.detach() for k, v in scan_inputs(L=5).items()}
    torch.testing.assert_close(kernels.selective_scan(**args), kernels.selective_scan_chunked(**args), atol=0, rtol=0)


def spy_on_scan_launches(monkeypatch):
    """Wraps the forward kernel's launches; returns the list of (SAVE_CKPT, checkpoint buffer) per launch."""
    launches, real = [], kernels._scan_fwd_kernel

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kw):
                launches.append((kw["SAVE_CKPT"], args[11]))  # args[11]: the checkpoint buffer
                return real[grid](*args, **kw)
            return launch
    monkeypatch.setattr(kernels, "_scan_fwd_kernel", Spy())
    return launches


def test_triton_scan_writes_checkpoints_only_for_a_backward(monkeypatch):  # under TRITON_INTERPRET=1
    launches = spy_on_scan_launches(monkeypatch)
    args = scan_inputs(L=40)
    out, last = kernels.selective_scan_triton(**args, return_last_state=True, block_d=4, ckpt=16)
    save, buf = launches[-1]
    assert save and buf.shape == (2, 3, 5, 4) and out.grad_fn is not None  # (B, ceil(40 / 16), D, N padded to 4)
    with torch.no_grad():
        out_ng, last_ng = kernels.selective_scan_triton(**args, return_last_state=True, block_d=4, ckpt=16)
    detached = {k: v.detach() for k, v in args.items()}
    out_det = kernels.selective_scan_triton(**detached, block_d=4, ckpt=16)  # grad mode on, nothing needs grad
    for save, buf in launches[-2:]:  # no buffer: the kernel gets u in its place and never writes there
        assert not save and buf.data_ptr() == args["u"].data_ptr()
    assert out_ng.grad_fn is None and out_det.grad_fn is None
    assert torch.equal(out_ng, out) and torch.equal(last_ng, last) and torch.equal(out_det, out)


@needs_gpu
@pytest.mark.parametrize("Bsz,Dm,N,L,dtype", [
    (2, 200, 16, 333, F32),  # L not a multiple of the checkpoint interval, D not a multiple of the block
    (32, 1024, 16, 2048, BF16),  # the benchmark's size
])
def test_scan_triton_gpu_matches_float64(Bsz, Dm, N, L, dtype, poisoned):
    assert_scan_close_to_float64(scan_bench_inputs(Bsz, Dm, N, L, dtype, "cuda"), impl="triton")


def scan_bench_inputs(Bsz, Dm, N, L, dtype, device):
    g = torch.Generator().manual_seed(0)  # the scan benchmark's inputs
    r = lambda *s: torch.randn(*s, generator=g)
    args = dict(u=r(Bsz, Dm, L).to(dtype), delta=(r(Bsz, Dm, L) - 2).to(dtype), A=-torch.rand(Dm, N, generator=g) * 8,
                B=r(Bsz, N, L).to(dtype), C=r(Bsz, N, L).to(dtype), D=r(Dm), z=r(Bsz, Dm, L).to(dtype), delta_bias=r(Dm) * 0.1,
                initial_state=r(Bsz, Dm, N))
    return {k: v.to(device) for k, v in args.items()}


def assert_scan_close_to_float64(args, **kw):
    """The scan's output, last state and every gradient against float64 (the reference on the same values),
    each element's error relative to its own size (plus the mean size, for elements near zero): at most 2x
    the reference's worst such error at the inputs' precision, plus 16 float32 ulps, plus one ulp of a bf16
    result (the kernel and the reference round fp32 values a summation order apart: an ulp apart at worst)."""
    g = torch.Generator().manual_seed(1)
    w_out, w_last = (torch.randn(t.shape, generator=g).to(t) for t in (args["u"], args["initial_state"]))

    def run(fn, a, **kw):
        a = {k: v.detach().requires_grad_() for k, v in a.items()}
        out, last = fn(**a, return_last_state=True, **kw)
        loss = (out * w_out.to(out.dtype)).sum() + (last * w_last.to(last.dtype)).sum()
        return [out, last, *torch.autograd.grad(loss, list(a.values()))]
    exact = run(kernels.selective_scan_ref, {k: v.double() for k, v in args.items()})
    same_precision = run(kernels.selective_scan_ref, args)
    got = run(kernels.selective_scan, args, **kw)
    bad = []
    for name, a, ref, pt in zip(["out", "last", *("d" + k for k in args)], got, exact, same_precision):
        size = ref.abs() + ref.abs().mean()
        err, err_pt = ((a.double() - ref).abs() / size).max().item(), ((pt.double() - ref).abs() / size).max().item()
        bound = 2 * err_pt + 16 * torch.finfo(torch.float32).eps + (torch.finfo(a.dtype).eps if a.dtype == BF16 else 0)
        record_error(name, err, bound, f"error / element size; 2x PyTorch {2 * err_pt:.3g}")
        if not err <= bound:  # NaN (an unwritten element) fails too
            bad.append(f"{name} {err:.2g} > {bound:.2g}")
    assert not bad, f"beyond 2x the reference's error at the same precision: {', '.join(bad)}"


def test_mamba_shapes_and_initial_loss():
    m = tiny_mamba()
    idx, targets = torch.randint(0, 61, (3, 17)), torch.randint(0, 61, (3, 17))
    logits, loss = m(idx, targets)
    assert logits.shape == (3, 17, 61) and logits.dtype == torch.float32
    assert abs(loss.item() - math.log(61)) < 0.1 and set(m.aux) == {"ce"}


@pytest.mark.parametrize("scan", ["chunked", "triton", "loop"])
def test_mamba_scan_paths_agree_in_the_model(scan):
    assert_same_loss_and_grads(tiny_mamba(scan=scan), tiny_mamba(scan="ref"))


@pytest.mark.parametrize("selective", ["dt", "bc", "none"])
@pytest.mark.parametrize("scan", ["chunked", "triton", "loop"])
def test_mamba_scan_paths_agree_when_not_selective(scan, selective):
    assert_same_loss_and_grads(tiny_mamba(scan=scan, selective=selective), tiny_mamba(scan="ref", selective=selective))


@pytest.mark.parametrize("selective, dt_varies, bc_varies", [("all", True, True), ("dt", True, False),
                                                             ("bc", False, True), ("none", False, False)])
def test_mamba_selectivity_is_what_depends_on_the_input(selective, dt_varies, bc_varies, monkeypatch):
    """The step size softplus(dt + bias) and B, C that reach the scan, for two different inputs: they vary with
    the input (across batch and time) exactly where the layer is selective; elsewhere one learned constant each."""
    seen = []
    scan = kernels.selective_scan
    monkeypatch.setattr(kernels, "selective_scan", lambda u, dt, A, Bm, Cm, *a, delta_bias, **kw: (
        seen.append((F.softplus(dt + delta_bias[:, None]), Bm, Cm)), scan(u, dt, A, Bm, Cm, *a, delta_bias=delta_bias, **kw))[1])
    m = tiny_mamba(selective=selective, n_layer=1)
    m(torch.randint(0, 61, (3, 20)))
    (delta, Bm, Cm), = seen  # (3, I, 20), (3, N, 20) x2
    varies = lambda t: not torch.equal(t, t[:1, :, :1].expand_as(t))  # any entry other than batch 0, position 0's
    assert (varies(delta), varies(Bm), varies(Cm)) == (dt_varies, bc_varies, bc_varies)
    mx = m.blocks[0].mixer
    if not dt_varies:  # the constants are the parameters: one step size per channel, one B and C per state entry
        torch.testing.assert_close(delta[0, :, 0], F.softplus(mx.dt_bias), atol=0, rtol=0)
    if not bc_varies:
        assert torch.equal(Bm[0, :, 0], mx.B_lti) and torch.equal(Cm[0, :, 0], mx.C_lti)
    I, N, R = m.config.d_inner, m.config.d_state, m.config.dt_rank  # x_proj and dt_proj shrink by what is constant
    full = tiny_mamba(n_layer=1).num_params()
    # constant dt: x_proj loses R outputs and dt_proj its matrix (its bias stays, as dt_bias); constant B, C: x_proj
    # loses 2N outputs, B_lti and C_lti hold 2N
    assert full - m.num_params() == 2 * I * R * (not dt_varies) + (2 * I * N - 2 * N) * (not bc_varies)


def test_mamba_config():
    cfg = model_mamba.Config(d_model=40)
    assert cfg.dt_rank == 3 and cfg.d_inner == 80  # ceil(40 / 16), expand * d_model
    assert "d_inner 80" in model_mamba.Model(cfg).summary()


def test_mamba_init_and_optimizer_groups():
    m = tiny_mamba(n_layer=8, d_model=96, d_state=16, bias=True)
    cfg = m.config
    for block in m.blocks:
        mx = block.mixer
        dt = F.softplus(mx.dt_proj.bias)  # the step size at init, for a zero input
        assert dt.min() >= cfg.dt_min * 0.999 and dt.max() <= cfg.dt_max * 1.001
        assert dt.max() / dt.min() > 10  # spread log-uniformly, not all equal (nor the generic zero bias)
        bound = cfg.dt_rank ** -0.5
        assert mx.dt_proj.weight.abs().max() <= bound and mx.dt_proj.weight.abs().max() > bound / 2  # not N(0, 0.02)
        torch.testing.assert_close(-torch.exp(mx.A_log), -torch.arange(1, 17.0).repeat(cfg.d_inner, 1))  # S4D-real
        assert torch.equal(mx.D, torch.ones(cfg.d_inner))
    p = dict(m.named_parameters())
    # PyTorch's default U(+-1/sqrt(fan_in)) for in_proj, x_proj and the conv; out_proj divided by sqrt(n_layer)
    bound = lambda name: p[name].abs().max().item() * math.sqrt(p[name][0].numel())  # 1 for that default
    std = lambda name: p[name].std().item() * math.sqrt(3 * p[name][0].numel())  # 1 for that default
    for name in ("blocks.0.mixer.in_proj.weight", "blocks.0.mixer.x_proj.weight", "blocks.0.mixer.conv1d.weight"):
        assert 0.95 < bound(name) <= 1 and abs(std(name) - 1) < 0.1, name
    assert 0.95 < bound("blocks.0.mixer.out_proj.weight") * math.sqrt(8) <= 1.0001
    assert abs(std("blocks.0.mixer.out_proj.weight") * math.sqrt(8) - 1) < 0.05
    conv_bias = p["blocks.0.mixer.conv1d.bias"]  # the conv's default bias too: U(+-1/sqrt(d_conv)), not zero
    assert conv_bias.abs().max() <= cfg.d_conv ** -0.5 and abs(conv_bias.std() * math.sqrt(3 * cfg.d_conv) - 1) < 0.2
    assert abs(p["wte.weight"].std().item() - 1) < 0.05 and m.lm_head.weight is not m.wte.weight  # untied by default
    assert 0.95 < bound("lm_head.weight") <= 1  # the head at PyTorch's default
    official = model_mamba.Model(model_mamba.Config(**{**dataclasses.asdict(cfg), "tie_embeddings": True}))
    assert abs(official.wte.weight.std().item() - 0.02) < 0.001 and official.lm_head.weight is official.wte.weight
    assert not p["blocks.0.mixer.in_proj.bias"].any() and not p["blocks.0.mixer.out_proj.bias"].any()
    decay, keep = m.optim_groups(0.1)
    names = {p: n.split(".", 2)[-1] if n.startswith("blocks.") else n for n, p in m.named_parameters()}  # without "blocks.i."
    assert {names[p] for p in keep["params"]} == {"norm.weight", "norm_f.weight", "mixer.A_log", "mixer.D", "mixer.dt_proj.bias",
                                                  "mixer.conv1d.bias", "mixer.in_proj.bias", "mixer.out_proj.bias"}
    assert {names[p] for p in decay["params"]} == {"wte.weight", "lm_head.weight", "mixer.in_proj.weight", "mixer.conv1d.weight",
                                                   "mixer.x_proj.weight", "mixer.dt_proj.weight", "mixer.out_proj.weight"}


# ----------------------------------------------------------------------------- MoE
# Routing, balance and z-losses, expert paths, capacity, active parameters, the copied Transformer parts

def moe_layer(**kw):
    torch.manual_seed(0)
    cfg = model_moe.Config(**{**dict(vocab_size=61, d_model=32, n_layer=2, n_head=4, d_ff=48), **kw})
    layer = model_moe.MoE(cfg)
    nn.init.normal_(layer.router.weight, std=0.5)  # a trained router's spread, not the init's near-ties
    return layer.eval()  # eval: the sigmoid router's bias stays put


@pytest.mark.parametrize("variant", [dict(), dict(router="sigmoid"), dict(top_k=1, n_expert=5)], ids=ID)
def test_moe_routing_invariants(variant):
    m = moe_layer(**variant)
    k = m.cfg.top_k
    tok, expert, weight = m.route(torch.randn(37, 32))
    assert torch.equal(tok, torch.arange(37).repeat_interleave(k))  # dropless: every token k times
    expert, weight = expert.view(37, k), weight.view(37, k)
    assert all(len(set(row.tolist())) == k for row in expert)  # k distinct experts
    assert (weight >= 0).all()
    torch.testing.assert_close(weight.sum(-1), torch.ones(37))


def test_moe_unnormalised_weights_are_the_router_probabilities():
    m = moe_layer(norm_topk=False)
    x = torch.randn(37, 32)
    _, expert, weight = m.route(x)
    probs = torch.softmax(x @ m.router.weight.t(), dim=-1)  # (N, E)
    torch.testing.assert_close(weight.view(37, 2), probs.gather(-1, expert.view(37, 2)))
    assert (weight.view(37, 2).sum(-1) < 1).all()


def test_balance_loss_is_one_when_balanced_and_larger_when_collapsed():
    m = moe_layer(n_expert=8, top_k=2)
    with torch.no_grad():
        m.router.weight.zero_()
        m.router.weight[:, :8] = torch.eye(8)
    prefer = lambda i: 10 * (torch.eye(32)[i % 8] + 0.5 * torch.eye(32)[(i + 1) % 8])  # expert i, then i+1
    m.route(torch.stack([prefer(i) for i in range(8)]))  # each expert chosen equally often, symmetric probs
    assert abs(m.losses[0].item() - 1.0) < 1e-6
    m.route(torch.stack([prefer(0)] * 8))  # every token: experts 0 and 1
    assert m.losses[0].item() > 3.9  # = 8 * (0.5 P_0 + 0.5 P_1), P_0 + P_1 ~ 1


def test_z_loss_at_zero_logits_is_log_e_squared():
    m = moe_layer(n_expert=8)
    nn.init.zeros_(m.router.weight)
    m.route(torch.randn(10, 32))
    assert abs(m.losses[1].item() - math.log(8) ** 2) < 1e-5


def test_sigmoid_bias_chooses_but_does_not_weight_and_moves_against_load():
    m = moe_layer(router="sigmoid", norm_topk=False)
    x = torch.randn(50, 32)
    m.route_bias[5] = 10.0  # expert 5 now wins every token...
    _, expert, weight = m.route(x)
    assert (expert.view(50, 2)[:, 0] == 5).all()
    probs = torch.sigmoid(x @ m.router.weight.t())
    torch.testing.assert_close(weight.view(50, 2)[:, 0], probs[:, 5])  # ...with its plain sigmoid weight
    assert m.route_bias[5] == 10.0  # eval: no update
    m.train()
    m.route(x)
    assert m.route_bias[5] == 10.0 - m.cfg.bias_rate and (m.route_bias[m.last["load"] == 0] == m.cfg.bias_rate).all()


@pytest.mark.parametrize("variant", [dict(ffn="swiglu"), dict(ffn="gelu", expert_path="loop"), dict(router="sigmoid")], ids=ID)
def test_moe_with_identical_experts_is_a_dense_feed_forward(variant):
    m = moe_layer(**variant)
    dense = model_moe.SwiGLU(m.cfg) if m.cfg.ffn == "swiglu" else model_moe.MLP(m.cfg)
    first = dense.gate_up if m.cfg.ffn == "swiglu" else dense.fc
    with torch.no_grad():
        m.w_in.copy_(first.weight.t().expand_as(m.w_in))
        m.w_out.copy_(dense.out_proj.weight.t().expand_as(m.w_out))
    x = torch.randn(2, 9, 32)
    torch.testing.assert_close(m(x), dense(x))  # the k weights sum to 1


@pytest.mark.parametrize("variant", [dict(), dict(n_expert=16, top_k=3, d_expert=16, n_shared=2, ffn="gelu"),
                                     dict(router="sigmoid", capacity_factor=0.8)], ids=ID)
def test_moe_grouped_path_equals_loop_with_an_idle_expert(variant, monkeypatch):
    m = moe_layer(**variant)
    with torch.no_grad():
        m.router.weight[3, 0] = -100.0  # feature 0 is 1 for every token below: expert 3 gets none
    x = torch.randn(3, 7, 32)  # 21 tokens: no multiple of anything
    x[..., 0] = 1.0
    x.requires_grad_(True)
    g = torch.randn(3, 7, 32)  # a random upstream gradient
    params = [x] + [p for p in m.parameters()]
    results = []
    for path, patch in (("loop", False), ("grouped", False), ("grouped", True)):
        if patch:  # a torch without grouped_mm: segment_mm's fallback loops over the segments
            monkeypatch.delattr(torch.nn.functional, "grouped_mm")
        m.cfg.expert_path = path
        y = m(x)
        results.append([y] + list(torch.autograd.grad(y, params, g)))
    assert m.last["load"][3] == 0
    for other in results[1:]:
        for a, b in zip(results[0], other):
            torch.testing.assert_close(a, b)


def test_capacity_factor_breaks_causality_and_prefix_consistency():
    m = tiny_moe(capacity_factor=1.0)
    idx = torch.randint(0, 61, (1, 40))
    changed = idx.clone()
    changed[:, 20:] = torch.randint(0, 61, (1, 20))
    a, b = m(idx)[0], m(changed)[0]
    assert m.stats()["moe_drop"] > 0
    assert not torch.allclose(a[:, :20], b[:, :20])  # later tokens pushed earlier ones out of an expert
    assert not torch.allclose(m(idx[:, :20])[0], a[:, :20])  # a prefix has another capacity


def test_moe_loss_adds_balance_and_z_loss():
    m = tiny_moe(balance_coef=0.1, z_coef=0.01)
    idx = torch.randint(0, 61, (2, 20))
    _, loss = m(idx, idx)
    aux = m.aux
    assert set(aux) == {"ce", "balance", "z"} and aux["balance"] >= 1.0 - 1e-6
    torch.testing.assert_close(loss.detach(), aux["ce"] + 0.1 * aux["balance"] + 0.01 * aux["z"])
    s = m.stats()
    assert set(s) == {"moe_vio", "moe_vio_worst", "moe_ent", "moe_ent_worst", "moe_dead", "moe_drop", "moe_top1"}
    layers = m.layer_stats()
    assert len(layers) == 2 and abs(sum(layers[0]["load"]) - 1) < 1e-6 and 0 < s["moe_ent"] <= 1


def test_moe_counts_active_parameters_and_flops():
    dense = tiny_transformer(d_ff=64)
    moe = tiny_moe(d_ff=64, n_expert=8, top_k=2, d_expert=32)  # 2 experts of 32 per token = one dense ffn of 64
    router = 2 * 8 * 48
    assert moe.num_params(active=True) == dense.num_params() + router
    assert moe.num_params() == dense.num_params() + router + 2 * 6 * 3 * 48 * 32  # 6 more experts per layer
    assert moe.flops_per_token() == dense.flops_per_token() + 6 * router


def test_moe_grouped_path_alone_needs_multiples_of_8():
    model_moe.Config(d_expert=20, expert_path="loop")  # grouped: CONFIG_ERRORS


@pytest.mark.parametrize("variant", [*VARIANTS, dict(pos="sinusoidal", ffn="relu", norm="layernorm", bias=True)], ids=ID)
def test_moe_with_one_expert_is_the_transformer(variant):
    """model_moe.py's copies of the Transformer's parts, run: one expert at top-1 (weight 1) holding the
    Transformer's feed-forward, and no auxiliary losses, give the Transformer's loss and gradients."""
    dense = tiny_transformer(**variant)
    moe = tiny_moe(**variant, n_expert=1, top_k=1, balance_coef=0.0, z_coef=0.0)
    expert = lambda n: n.split(".ffn.")[0] + (".ffn.w_out" if "out_proj" in n else ".ffn.w_in")  # (1, F, C), (1, C, 2F)
    names = {n: expert(n) if ".ffn." in n else n for n in dense.state_dict() if not (".ffn." in n and n.endswith("bias"))}
    assert not any(v.any() for n, v in dense.state_dict().items() if n not in names)  # the experts have no biases
    moe.load_state_dict({**{k: v for k, v in moe.state_dict().items() if "router" in k},
                         **{names[n]: v.t()[None] if ".ffn." in n else v for n, v in dense.state_dict().items() if n in names}})
    idx, targets = torch.randint(0, 61, (2, 23)), torch.randint(0, 61, (2, 23))
    params = [n for n, _ in dense.named_parameters() if n in names]
    want, got = loss_and_grads(dense, idx, targets, params), loss_and_grads(moe, idx, targets, [names[n] for n in params])
    for n, a, b in zip(["loss", *params], got, want):
        torch.testing.assert_close(a[0].t() if ".ffn." in n else a, b, atol=1e-6, rtol=1e-5, msg=n)


def test_moe_copies_the_new_transformer_features():
    src = inspect.getsource
    assert src(model_moe.MLP) == src(model_transformer.MLP)
    assert src(model_moe.check) == src(model_mamba.check) == src(model_transformer.check)
    assert src(model_moe.Model.rope) == src(model_transformer.Model.rope)
    assert src(model_moe.rope_frequencies) == src(model_transformer.rope_frequencies)
    assert src(model_moe.Attention) == src(model_transformer.Attention)


# ----------------------------------------------------------------------------- hybrid and Zamba
# The layer pattern, blocks equal to their sources, the shared block, inner norms, init, accounting

def test_hybrid_layer_pattern():
    cfg = model_hybrid.Config()  # Jamba's block: attention in one layer of eight, MoE in every other
    assert (cfg.layers, cfg.n_layer, cfg.n_attn) == ("Md Me Md Me Ad Me Md Me", 8, 1)
    m = tiny_hybrid(layers=" Ad  Md Me S M Ae ")
    assert m.config.layers == "Ad Md Me S M Ae" and m.config.n_layer == 6 and m.config.layers in m.summary()
    kinds = [(b.kind, type(getattr(b, "mixer", None)).__name__, type(b.ffn).__name__) for b in m.blocks]
    assert kinds == [("A", "Attention", "SwiGLU"), ("M", "MambaLayer", "SwiGLU"), ("M", "MambaLayer", "MoE"),
                     ("S", "NoneType", "NoneType"), ("M", "MambaLayer", "NoneType"), ("A", "Attention", "MoE")]
    assert m.cache_index == [0, 0, 1, 1, 2, 2]  # place among the attention uses (A, S), or among the Mamba layers
    cache = m.new_cache(3)
    assert cache.k.shape[:2] == (3, 3) and cache.ssm.shape[:2] == (3, 3) and cache.conv.shape[:2] == (3, 3)


def assert_same_layer(mine, ref, x, mine_args, ref_args):
    """A copied layer and its source, with the same weights: the same output and the same gradients
    (input and every weight, for a random upstream gradient), bit for bit."""
    x = x.clone().requires_grad_()
    outs = [layer(x, *args) for layer, args in ((mine, mine_args), (ref, ref_args))]
    g = torch.randn_like(outs[1])
    names = [n for n, _ in ref.named_parameters()]
    grads = [torch.autograd.grad(out, [x, *(dict(layer.named_parameters())[n] for n in names)], g)
             for out, layer in zip(outs, (mine, ref))]
    for name, a, b in zip(["output", "input", *names], [outs[0], *grads[0]], [outs[1], *grads[1]]):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=name)


def test_hybrid_blocks_match_their_sources():
    """The guide: copied blocks stay identical (text), and where the hybrid's copy is cut down (no
    ALiBi, one router, experts as modules), the same weights give the same outputs."""
    src = inspect.getsource
    for name in ("RMSNorm", "SwiGLU", "sample_next", "check"):
        assert src(getattr(model_hybrid, name)) == src(getattr(model_transformer, name)), name
    assert src(model_hybrid.Model.optim_groups) == src(model_transformer.Model.optim_groups)
    torch.manual_seed(0)
    x = torch.randn(2, 11, 32)
    # attention, with and without a KV cache
    tcfg = model_transformer.Config(d_model=32, n_head=4, n_kv_head=2, pos="none", block_size=40)
    ref, attn = model_transformer.Attention(tcfg), model_hybrid.Attention(tiny_hybrid().config, 32)
    attn.load_state_dict(ref.state_dict())
    assert_same_layer(attn, ref, x, (None, 0), (None, None, 0))
    kv_ref, kv = model_transformer.KVCache(1, 2, 2, 40, 8, "cpu", torch.float32), tiny_hybrid().new_cache(2)
    for a, b in ((0, 5), (5, 6), (6, 11)):
        torch.testing.assert_close(attn(x[:, a:b], kv, 0), ref(x[:, a:b], None, kv_ref, 0), atol=0, rtol=0)
        kv.len = kv_ref.len = b
    # the Mamba layer (without Jamba's inner norm) is model_mamba's, full sequence and step by step
    mcfg = model_mamba.Config(d_model=32, d_state=8)
    ref, mamba = model_mamba.MambaLayer(mcfg), model_hybrid.MambaLayer(tiny_hybrid(inner_norm=False).config)
    mamba.load_state_dict(ref.state_dict())
    assert_same_layer(mamba, ref, x, (None, 0), (None, 0))
    c_ref, c = (model_mamba.MambaCache(1, 2, 64, 4, 8, "cpu", torch.float32) for _ in range(2))
    for t in range(3):
        torch.testing.assert_close(mamba(x[:, t:t + 1], c, 0), ref(x[:, t:t + 1], c_ref, 0), atol=0, rtol=0)
    # the MoE is model_moe's softmax top-k dropless router with SwiGLU experts (Jamba's weights, or Mixtral's renormalised)
    for norm_topk in (False, True):
        ecfg = model_moe.Config(d_model=32, n_head=4, n_expert=4, top_k=2, d_expert=24, norm_topk=norm_topk)
        ref = model_moe.MoE(ecfg)
        moe = model_hybrid.MoE(tiny_hybrid(n_expert=4, top_k=2, d_expert=24, norm_topk=norm_topk).config)
        nn.init.normal_(ref.router.weight, std=0.5)  # a trained router's spread, not the init's near-ties
        with torch.no_grad():
            moe.router.weight.copy_(ref.router.weight)
            for e, expert in enumerate(moe.experts):
                expert.gate_up.weight.copy_(ref.w_in[e].t())
                expert.out_proj.weight.copy_(ref.w_out[e].t())
        torch.testing.assert_close(moe(x), ref(x))
        torch.testing.assert_close(torch.stack(moe.losses), torch.stack(ref.losses))
        torch.testing.assert_close(moe.last[0], ref.last["load"])


def test_decoding_runs_only_the_chosen_experts(monkeypatch):
    """Without gradients (decoding, evaluation) an MoE layer calls only the experts some token chose;
    with them, every expert, so that each weight gets a gradient. The outputs are the same."""
    m = tiny_hybrid(n_expert=8, top_k=2)
    moes = [b.ffn for b in m.blocks if isinstance(b.ffn, model_hybrid.MoE)]
    calls = []
    for i, moe in enumerate(moes):
        for e, ffn in enumerate(moe.experts):
            ffn.register_forward_hook(lambda mod, a, out, key=(i, e): calls.append(key))
    idx = torch.randint(0, 61, (1, 12))
    with torch.no_grad():
        skipped = m(idx)[0]
        assert 0 < len(calls) < 8 * len(moes)
        calls.clear()
        cache = m.new_cache(1)
        m(idx[:, :-1], cache=cache)
        calls.clear()
        step = m(idx[:, -1:], cache=cache)[0]  # one new token: top_k experts per MoE layer
        assert sorted(i for i, _ in calls) == [i for i in range(len(moes)) for _ in range(2)]
    calls.clear()
    every = m(idx)[0]
    assert sorted(set(calls)) == [(i, e) for i in range(len(moes)) for e in range(8)]
    torch.testing.assert_close(skipped, every, atol=0, rtol=0)
    torch.testing.assert_close(step[:, -1], every[:, -1])
    tokens = lambda: torch.cat(list(m.generate(idx, 6, temperature=0)), dim=1)
    ours = tokens()
    monkeypatch.setattr(torch, "is_grad_enabled", lambda: True)  # every expert again, as before
    assert torch.equal(ours, tokens())
    monkeypatch.undo()
    # model_moe's readable loop does the same; its grouped path runs no per-expert code
    layer = moe_layer(expert_path="loop", n_expert=8)
    acts, act = [], layer.act
    monkeypatch.setattr(layer, "act", lambda h: acts.append(len(h)) or act(h))  # one call per expert run
    x = torch.randn(1, 1, 32)
    y_all = layer(x)
    assert len(acts) == 8
    acts.clear()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), y_all, atol=0, rtol=0)
    assert len(acts) == layer.cfg.top_k


def test_hybrid_all_attention_is_the_transformer():
    """Every layer attention with a dense feed-forward: the hybrid is model_transformer without positions."""
    hybrid = tiny_hybrid(layers="Ad Ad Ad Ad")
    torch.manual_seed(1)
    ref = model_transformer.Model(model_transformer.Config(vocab_size=61, block_size=40, d_model=32, n_layer=4,
                                                           n_head=4, pos="none")).eval()
    hybrid.load_state_dict({k.replace(".attn.", ".mixer."): v for k, v in ref.state_dict().items()})
    idx, targets = torch.randint(0, 61, (2, 23)), torch.randint(0, 61, (2, 23))
    (a, la), (b, lb) = hybrid(idx, targets), ref(idx, targets)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    torch.testing.assert_close(la, lb, atol=0, rtol=0)
    assert hybrid.num_params() == ref.num_params() == hybrid.num_params(active=True)
    assert hybrid.flops_per_token() == ref.flops_per_token()


def test_hybrid_shared_block_is_one_set_of_weights():
    """Zamba: the S block's weights are one set, counted once, trained by every use."""
    m = tiny_hybrid(layers="M M S M M S M S")
    uses = [b for b in m.blocks if b.kind == "S"]
    assert uses[0].shared is uses[1].shared is uses[2].shared and uses[0].out_proj is not uses[1].out_proj
    shared = sum(p.numel() for p in uses[0].shared.parameters())
    assert shared == 2 * 32 * (4 + 2 * 2) * 8 + 32 * 32 + 3 * 32 * m.config.d_ff + 2 * 32 + 32  # attn, SwiGLU, norms
    one_use_less = tiny_hybrid(layers="M M S M M S M")  # the third use adds only its own C x C projection
    assert m.num_params() - one_use_less.num_params() == 32 * 32
    assert len(m.state_dict()) > len(list(m.parameters()))  # each use names the shared weights; one tensor
    # the gradient reaches the shared weights from every use: with the other uses' projections zeroed, each alone
    idx = torch.randint(0, 61, (2, 20))
    qkv = uses[0].shared.attn.qkv.weight
    for i in range(len(uses) + 1):
        with torch.no_grad():
            for j, use in enumerate(uses):
                use.out_proj.weight.normal_(std=0.02) if j == i else use.out_proj.weight.zero_()
        grad, = torch.autograd.grad(m(idx, idx)[1], qkv)
        assert (grad.abs().sum() > 0) == (i < len(uses))  # zero only when no use reaches the output


def test_hybrid_inner_norm_makes_dt_b_c_scale_free():
    """With RMSNorm on dt, B and C, scaling x_proj changes nothing; without it, everything. (A tiny
    norm_eps: at init dt, B and C have a mean square near 5e-4, where the default 1e-5 still counts.)"""
    x = torch.randn(2, 20, 32)
    for inner_norm in (True, False):
        mamba = tiny_hybrid(inner_norm=inner_norm, norm_eps=1e-12).blocks[0].mixer
        with torch.no_grad():
            mamba.D.zero_()  # no skip connection: the output is the scan's alone
        before = mamba(x, None, 0)
        with torch.no_grad():
            mamba.x_proj.weight.mul_(10.0)
        after = mamba(x, None, 0)
        if inner_norm:
            torch.testing.assert_close(after, before, atol=1e-6, rtol=1e-4)
        else:
            assert (after - before).norm() > before.norm()  # B and C 10x larger: the readout C h 100x


def test_hybrid_init_and_optimizer_groups():
    m = tiny_hybrid(d_model=96, d_state=16, layers="Md Me Md Me Ad Me Md S")
    cfg = m.config
    for mx in [b.mixer for b in m.blocks if b.kind == "M"]:  # the Mamba init survives the model's generic init
        dt = F.softplus(mx.dt_proj.bias)  # the step size at init, for a zero input
        assert dt.min() >= 1e-3 * 0.999 and dt.max() <= 0.1 * 1.001 and dt.max() / dt.min() > 10
        bound = cfg.dt_rank ** -0.5
        assert bound / 2 < mx.dt_proj.weight.abs().max() <= bound  # uniform in +-1/sqrt(R), not N(0, 0.02)
        torch.testing.assert_close(-torch.exp(mx.A_log), -torch.arange(1, 17.0).repeat(cfg.d_inner, 1))  # S4D-real
        assert torch.equal(mx.D, torch.ones(cfg.d_inner))
    params = dict(m.named_parameters())
    for name, p in params.items():  # PyTorch's defaults: matrices uniform in +-1/sqrt(fan_in), embeddings N(0, 1)
        if name.endswith(("proj.weight", "qkv.weight", "gate_up.weight", "router.weight", "lm_head.weight")):
            bound = p.shape[1] ** -0.5
            assert 0.9 * bound < p.abs().max() <= bound and abs(p.std().item() * 3 ** 0.5 / bound - 1) < 0.1, name
    assert abs(params["wte.weight"].std().item() - 1) < 0.05 and "lm_head.weight" in params  # untied
    assert all(not p.any() for n, p in params.items() if n.endswith("bias") and "dt_proj" not in n and "conv" not in n)
    decay, keep = m.optim_groups(0.1)
    names = {p: n.split(".", 2)[-1] if n.startswith("blocks.") else n for n, p in m.named_parameters()}  # without "blocks.i."
    assert {names[p] for p in keep["params"]} == {
        "norm1.weight", "norm2.weight", "norm_f.weight", "mixer.A_log", "mixer.D", "mixer.dt_proj.bias", "mixer.conv1d.bias",
        "mixer.dt_norm.weight", "mixer.B_norm.weight", "mixer.C_norm.weight", "shared.norm1.weight", "shared.norm2.weight"}
    assert {names[p] for p in decay["params"]} == {
        "wte.weight", "mixer.in_proj.weight", "mixer.conv1d.weight", "mixer.x_proj.weight", "mixer.dt_proj.weight",
        "mixer.out_proj.weight", "mixer.qkv.weight", "ffn.gate_up.weight", "ffn.out_proj.weight", "ffn.router.weight",
        "lm_head.weight",
        "ffn.experts.0.gate_up.weight", "ffn.experts.0.out_proj.weight", "ffn.experts.1.gate_up.weight",
        "ffn.experts.1.out_proj.weight", "ffn.experts.2.gate_up.weight", "ffn.experts.2.out_proj.weight",
        "ffn.experts.3.gate_up.weight", "ffn.experts.3.out_proj.weight", "out_proj.weight", "shared.attn.qkv.weight",
        "shared.attn.out_proj.weight", "shared.ffn.gate_up.weight", "shared.ffn.out_proj.weight"}


def test_hybrid_loss_and_accounting():
    m = tiny_hybrid(balance_coef=0.1, z_coef=0.01)  # "Md Me Ad Me", 4 experts, top-2
    idx, targets = torch.randint(0, 61, (2, 20)), torch.randint(0, 61, (2, 20))
    _, loss = m(idx, targets)
    aux = m.aux
    assert set(aux) == {"ce", "balance", "z"} and abs(aux["ce"].item() - math.log(61)) < 0.1
    torch.testing.assert_close(loss.detach(), aux["ce"] + 0.1 * aux["balance"] + 0.01 * aux["z"])
    s = m.stats()
    assert set(s) == {"moe_vio", "moe_ent", "moe_dead", "moe_top1"} and 0 < s["moe_ent"] <= 1 and s["moe_vio"] >= 0
    # experts of d_ff / top_k: the two a token uses cost one dense feed-forward; only the router is added
    cfg, dense = m.config, tiny_hybrid(layers="Md Md Ad Md")
    assert cfg.d_expert * cfg.top_k == cfg.d_ff
    router, expert = cfg.d_model * cfg.n_expert, 3 * cfg.d_model * cfg.d_expert
    assert m.num_params(active=True) == dense.num_params() + 2 * router
    assert m.num_params() == dense.num_params() + 2 * router + 2 * (cfg.n_expert - cfg.top_k) * expert
    assert m.flops_per_token() == dense.flops_per_token() + 6 * 2 * router
    # Jamba's full-width experts: top-2 costs two dense feed-forwards
    wide = tiny_hybrid(d_expert=cfg.d_ff)
    assert wide.flops_per_token() == dense.flops_per_token() + 6 * 2 * (router + 3 * cfg.d_model * cfg.d_ff)
    # the other terms: per attention use 12 * H * D * context, per Mamba layer 27 * I * N, a shared block per use
    mamba = tiny_hybrid(layers="Md Md Md Md")
    attn_w = sum(p.numel() for p in dense.blocks[2].mixer.parameters())
    mamba_w = sum(p.numel() for n, p in mamba.blocks[2].mixer.named_parameters() if n.endswith("weight") and p.dim() >= 2)
    assert dense.flops_per_token() - mamba.flops_per_token() == 6 * (attn_w - mamba_w) + 12 * 4 * 8 * 40 - 27 * 64 * 8
    twice = tiny_hybrid(layers="Md S Md S")
    shared_w = sum(p.numel() for n, p in twice.blocks[1].shared.named_parameters() if p.dim() >= 2)
    assert twice.flops_per_token() - tiny_hybrid(layers="Md Md").flops_per_token() == (
        2 * (6 * (shared_w + 32 * 32) + 12 * 4 * 8 * 40))


# ----------------------------------------------------------------------------- synthetic tasks and baselines
# Generators against a rule-reading oracle, the no-recall baseline by hand, learning above chance, train.py

def synthetic_opts(task, **kw):
    return {**{k: v for k, (v, _) in train.OPTIONS.items()}, "dataset": task, **kw}


SMALL_TASKS = {  # small instances: (options, block_size)
    "selective_copy": (dict(task_vocab=5, copy_tokens=3), 14),
    "multi_induction": (dict(task_vocab=6, multi_induction_queries=2), 12),
    "induction_heads": (dict(task_vocab=5), 12),
    "mqar": (dict(task_vocab=5, mqar_pairs=3, mqar_queries=3), 14),
}


def synthetic_oracle(task, x, o):
    """Answers read off the input by the rules of the task, never from the targets: what a perfect
    model predicts. -1 where the task asks nothing."""
    pred = torch.full_like(x, -1)
    V = o["task_vocab"]
    for row, p in zip(x.tolist(), pred):
        if task == "selective_copy":
            go = row.index(1)  # '>'
            data = [t for t in row[:go] if t != 0]
            assert len(data) == o["copy_tokens"]
            for j, t in enumerate(data[:len(row) - go]):
                p[go + j] = t
        elif task == "multi_induction":
            Q = o["multi_induction_queries"]
            body = len(row) + 1 - 3 * Q
            assert [row[t] for t in range(body, len(row), 3)] == [0] * Q  # '!' before each question
            for t in range(body + 1, len(row), 3):
                key = row[t]
                assert row[:body].count(key) == 1  # the key occurs once before the questions
                p[t] = row[row.index(key) + 1]
        elif task == "induction_heads":
            assert row[-1] == 0 and row[:-1].count(0) == 1 and row.index(0) < len(row) - 2  # '!' once, then at the end
            assert all(1 <= t <= V for t in row if t != 0)
            p[-1] = row[row.index(0) + 1]
        else:
            P = o["mqar_pairs"]
            pairs = dict(zip(row[0:2 * P:2], row[1:2 * P:2]))
            assert len(pairs) == P and all(1 <= k <= V < v <= 2 * V for k, v in pairs.items())
            for t in range(2 * P, len(row)):
                if 1 <= row[t] <= V:
                    p[t] = pairs[row[t]]
    return pred


@pytest.mark.parametrize("task", data.SYNTHETIC)
def test_synthetic_generators_are_deterministic_with_disjoint_streams(task):
    kw, T = SMALL_TASKS[task]
    synth = train.load_data(synthetic_opts(task, **kw))
    draw = lambda split, seed: synth.batch(split, 16, T, torch.Generator().manual_seed(seed))
    for split in ("train", "val"):
        (x1, y1), (x2, y2), (x3, _) = draw(split, 5), draw(split, 5), draw(split, 6)
        assert torch.equal(x1, x2) and torch.equal(y1, y2)  # a seed fixes the batch
        assert not torch.equal(x1, x3)
    assert not torch.equal(draw("train", 5)[0], draw("val", 5)[0])  # validation is not the training stream


@pytest.mark.parametrize("task", data.SYNTHETIC)
def test_synthetic_oracle_scores_100_percent_and_only_answers_are_scored(task):
    kw, T = SMALL_TASKS[task]
    o = synthetic_opts(task, **kw)
    synth = train.load_data(o)
    answers = {"selective_copy": o["copy_tokens"], "multi_induction": o["multi_induction_queries"], "induction_heads": 1,
               "mqar": o["mqar_queries"]}[task]
    shortest = {"selective_copy": 6, "multi_induction": 9, "induction_heads": 3, "mqar": 11}[task]
    synth.check(shortest)
    with pytest.raises(UsageError, match="needs block_size >="):
        synth.check(shortest - 1)
    for length in (shortest, T, T + 1, 4 * T + 3):
        x, y = synth.batch("train", 64, length, torch.Generator().manual_seed(length))
        assert x.shape == y.shape == (64, length) and 0 <= x.min() and x.max() < synth.vocab_size
        assert torch.equal(y[:, :-1][y[:, :-1] != -1], x[:, 1:][y[:, :-1] != -1])  # targets are the next tokens
        assert ((y != -1).sum(1) == answers).all()
        assert torch.equal(synthetic_oracle(task, x, o), y)


def no_recall_guess(task, row, o):
    """The no-recall rule of each task, from one sequence by hand (ties: the smallest symbol)."""
    if task == "multi_induction":
        keys = {row[t + 1] for t in range(len(row) - 1) if row[t] == 0}
        return min(set(range(1, o["task_vocab"] + 1)) - keys)
    vals = (row[1:2 * o["mqar_pairs"]:2] if task == "mqar" else [t for t in row if t != 0] if task == "induction_heads"
            else [t for t in row[:row.index(1)] if t != 0])
    return max(sorted(set(vals)), key=vals.count)


@pytest.mark.parametrize("task", data.SYNTHETIC)
def test_synthetic_baseline_equals_the_rule_computed_by_hand(task):
    kw, T = SMALL_TASKS[task]
    o = synthetic_opts(task, **kw)
    synth = train.load_data(o)
    x, y = synth.batch("val", 200, T, torch.Generator().manual_seed(3))
    by_hand = torch.tensor([no_recall_guess(task, row, o) for row in x.tolist()])
    assert torch.equal(synth.guess(x), by_hand)
    right = sum(by_hand[b].item() == t for b, row in enumerate(y.tolist()) for t in row if t != -1)
    if task == "multi_induction":  # the value is uniform over the non-keys: any fixed non-key is right that often
        assert abs(right / (y != -1).sum().item() - 1 / (kw["task_vocab"] - kw["multi_induction_queries"])) < 0.05
    big_x, big_y = train.load_data(synthetic_opts(task)).batch("val", 2000, 64, torch.Generator().manual_seed(4))
    if task == "induction_heads":  # above chance (1/16): the answer is one of the 62 symbols counted (0.12 measured)
        g = train.load_data(synthetic_opts(task)).guess(big_x)
        assert 0.08 < (g[:, None] == big_y)[big_y != -1].float().mean().item() < 0.16
    elif task != "multi_induction":  # the bag rule at 8 of 16 symbols: E[largest count] / 8 = 0.258
        g = train.load_data(synthetic_opts(task)).guess(big_x)
        assert abs((g[:, None] == big_y)[big_y != -1].float().mean().item() - 0.258) < 0.015


@pytest.mark.parametrize("task", data.SYNTHETIC)
def test_synthetic_tasks_are_learned_above_chance(task):
    kw, T = {"multi_induction": (dict(task_vocab=6, multi_induction_queries=1), 8),  # one key: quick
             "induction_heads": (dict(task_vocab=4), 8)}.get(task, SMALL_TASKS[task])
    synth = train.load_data(synthetic_opts(task, **kw))
    torch.manual_seed(0)
    m = model_transformer.Model(model_transformer.Config(vocab_size=synth.vocab_size, block_size=T, d_model=32,
                                                         n_layer=2, n_head=2, n_kv_head=1))
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(300):
        x, y = synth.batch("train", 64, T, gen)
        _, loss = m(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    x, y = synth.batch("val", 512, T, gen)
    with torch.no_grad():
        acc = (m(x)[0].argmax(-1) == y)[y != -1].float().mean().item()
    assert acc > 2 / kw["task_vocab"], acc  # twice chance


def test_synthetic_train_py_reports_accuracy_extrapolation_and_samples_words(tmp_path):
    args = [*TINY_ARGS, "--dataset=multi_induction", "--task_vocab=6", "--multi_induction_queries=1", "--block_size=8", "--max_iters=4",
            "--eval_interval=2"]
    r = run("train.py", *args, f"--out_dir={tmp_path / 'rope'}")
    assert r.returncode == 0, r.stderr
    assert "chance 0.167" in r.stdout and "| val_acc " in r.stdout and "| val_acc_4x " in r.stdout
    rows = [json.loads(l) for l in (tmp_path / "rope" / "metrics.jsonl").read_text().splitlines()]
    evals = [row for row in rows if "val_loss" in row]
    assert len(evals) == 3 and all(0 <= e["val_acc"] <= 1 and 0 <= e["val_acc_4x"] <= 1 for e in evals)
    assert all(e["val_baseline"] == evals[0]["val_baseline"] and 0 < e["val_baseline"] < 1 for e in evals)
    r = run("train.py", *args, "--pos=learned", f"--out_dir={tmp_path / 'learned'}")  # no rows for 4x positions
    assert r.returncode == 0, r.stderr
    assert "no val_acc_4x, the weights do not fit" in r.stdout and "val_acc_4x" not in (tmp_path / "learned" / "metrics.jsonl").read_text()
    s = run("sample.py", f"--ckpt={tmp_path / 'rope'}/ckpt_last.pt", "--prompt=3 1 4 ! 1", "--max_new_tokens=4", "--device=cpu")
    assert s.returncode == 0, s.stderr
    words = s.stdout.split("---")[-1].split()
    assert words[:5] == ["3", "1", "4", "!", "1"] and len(words) == 9 and set(words[5:]) <= set("!012345")


def test_synthetic_bad_options(tmp_path, capsys):
    err = fails(capsys, train, "--dataset=selective_copy", "--copy_tokens=40", "--block_size=64", "--device=cpu", f"--out_dir={tmp_path}")
    assert err.strip() == "error: selective_copy needs block_size >= 2 * copy_tokens = 80, got 64"
    for kw, message in [(dict(task_vocab=1), "task_vocab must be >= 2"), (dict(mqar_queries=0), "positive"),
                        (dict(dataset="mqar", mqar_pairs=20), "needs as many distinct keys"), (dict(extrapolate=-1), "extrapolate"),
                        (dict(dataset="multi_induction", multi_induction_queries=16), "less than task_vocab"),
                        (dict(stop_acc=1.5), "stop_acc must be in"), (dict(stop_acc="nan"), "stop_acc must be in"),
                        (dict(patience=-1), "patience must be >= 0")]:
        with pytest.raises(UsageError, match=message):
            train.parse_args([f"--{k}={v}" for k, v in kw.items()])


# ----------------------------------------------------------------------------- the reference implementations
# Hugging Face transformers' GPT-2, Llama, Mixtral, Mamba and Jamba are the field's reference for each
# architecture. A tiny one of each is built here with random weights, written with save_pretrained and
# read back through pretrained.py into the model file: the same logits, through the cache too, the same
# greedy tokens. No network: the tests make their checkpoints.

REFERENCES = {  # name: (model class, config class, a tiny config)
    "gpt2": ("GPT2LMHeadModel", "GPT2Config", dict(n_positions=32, n_embd=32, n_layer=2, n_head=4)),
    "llama": ("LlamaForCausalLM", "LlamaConfig", dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                                      num_attention_heads=4, num_key_value_heads=2)),
    "mixtral": ("MixtralForCausalLM", "MixtralConfig", dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                                            num_attention_heads=4, num_key_value_heads=2,
                                                            num_local_experts=4, num_experts_per_tok=2)),
    "mamba": ("MambaForCausalLM", "MambaConfig", dict(hidden_size=32, num_hidden_layers=2, state_size=8)),
    "jamba": ("JambaForCausalLM", "JambaConfig", dict(  # Md Me Ad Me: Jamba's block at half depth
        hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        num_experts=4, num_experts_per_tok=2, attn_layer_period=4, attn_layer_offset=2, expert_layer_period=2,
        expert_layer_offset=1, mamba_d_state=8)),
}


def reference_pair(arch, folder, **fields):
    """(transformers' model, ours) with the same random weights, via save_pretrained and pretrained.py."""
    transformers = pytest.importorskip("transformers", reason="the reference tests need transformers (pip install transformers)")
    pytest.importorskip("safetensors", reason="pretrained.py reads safetensors (pip install safetensors)")
    model_cls, config_cls, tiny = REFERENCES[arch]
    config = getattr(transformers, config_cls)(**{"vocab_size": 64, "max_position_embeddings": 32, "bos_token_id": 0,
                                                  "eos_token_id": None, "pad_token_id": 0, **tiny, **fields})
    torch.manual_seed(0)
    ref = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():  # their init is N(0, 0.02): logits near zero would hide a wrong mapping
        for p in ref.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ref.save_pretrained(folder)
    _, ours = pretrained.load_model(folder)
    return ref, ours.eval()


@pytest.mark.parametrize("arch, fields", [(arch, {}) for arch in REFERENCES] + [
    ("llama", dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0})),  # PI, another base
    ("llama", dict(tie_word_embeddings=True, attention_bias=True, mlp_bias=True, num_key_value_heads=1))],  # SmolLM2: tied
    ids=["gpt2", "llama", "mixtral", "mamba", "jamba", "llama-linear-rope", "llama-tied-bias-mqa"])
def test_each_model_file_computes_its_reference_implementation(arch, fields, tmp_path):
    ref, ours = reference_pair(arch, tmp_path, **fields)
    idx = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref(idx).logits  # (B, T, V)
        full = (ours(idx)[0] - want).abs().max().item()
        cache = ours.new_cache(2)  # a parallel prefill of 7 tokens, then 9 single steps (KV cache, conv + SSM state)
        steps = [ours(idx[:, :7], cache=cache)[0]] + [ours(idx[:, t:t + 1], cache=cache)[0] for t in range(7, 16)]
        cached = (torch.cat(steps, dim=1) - want).abs().max().item()
    print(f"{arch} {fields or ''}: max |difference| {full:.1e}, through the cache {cached:.1e}, logits up to {want.abs().max():.1f}")
    assert full < 1e-5 and cached < 1e-5
    assert want.std() > 0.1  # logits that differ between tokens: a wrong weight would show
    greedy = ref.generate(idx[:, :5], max_new_tokens=12, do_sample=False, min_new_tokens=12)[:, 5:]
    assert torch.equal(torch.cat(list(ours.generate(idx[:, :5], 12, temperature=0)), dim=1), greedy)


def test_hybrid_weights_its_experts_as_jamba_and_mixtral_renormalises(tmp_path):
    """Jamba keeps the router's top-k probabilities as they are; norm_topk=True (Mixtral) changes the model."""
    ref, ours = reference_pair("jamba", tmp_path)
    renorm = model_hybrid.Model(dataclasses.replace(ours.config, norm_topk=True)).eval()
    renorm.load_state_dict(ours.state_dict())
    idx = torch.randint(0, 64, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (renorm(idx)[0] - ref(idx).logits).abs().max() > 1e-3


def test_zamba_shared_block_differs_from_the_reference_where_the_docstring_says(tmp_path):
    """model_hybrid's S is Zamba's shared block simplified in two places, both visible in transformers' Zamba:
    its attention heads are 2C / H wide (ours C / H), and its output goes to the next Mamba layer's input
    (ours joins the stream). So no Zamba checkpoint loads; the two places are checked here."""
    transformers = pytest.importorskip("transformers", reason="the reference tests need transformers")
    C, H = 32, 4
    zamba = transformers.ZambaForCausalLM(transformers.ZambaConfig(
        vocab_size=64, hidden_size=C, intermediate_size=48, num_hidden_layers=6, num_attention_heads=H,
        num_key_value_heads=H, attn_layer_period=2, attn_layer_offset=1, n_mamba_heads=1, mamba_d_state=8))
    shared = next(m for m in zamba.modules() if type(m).__name__ == "ZambaAttentionDecoderLayer")
    assert shared.self_attn.q_proj.weight.shape == (H * 2 * C // H, 2 * C)  # heads of 2C / H over [stream, embeddings]
    ours = model_hybrid.Model(model_hybrid.Config(vocab_size=64, d_model=C, n_head=H, n_kv_head=H, layers="M S M S"))
    assert ours.blocks[1].shared.attn.qkv.weight.shape == (3 * C, 2 * C)  # heads of C / H
    mamba_layer = next(m for m in zamba.modules() if type(m).__name__ == "ZambaMambaDecoderLayer")
    assert "transformer_hidden_states" in inspect.signature(mamba_layer.forward).parameters  # added to its input
    assert model_hybrid.__doc__.count("Zamba's 2C / H") == 1 and "only to the next Mamba layer's input" in model_hybrid.__doc__


def test_pretrained_refuses_what_the_model_file_cannot_honour(tmp_path):
    pytest.importorskip("transformers", reason="the reference tests need transformers")
    reference_pair("llama", tmp_path / "llama")
    reference_pair("jamba", tmp_path / "jamba")
    cases = [("llama", {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}}, "rope_scaling"),
             ("llama", {"sliding_window": 8}, "sliding_window"), ("llama", {"attention_bias": True}, "attention_bias"),
             ("llama", {"head_dim": 16}, "head_dim"), ("llama", {"hidden_act": "gelu"}, "hidden_act"),
             ("llama", {"model_type": "qwen2"}, "model_type"), ("jamba", {"mamba_proj_bias": True}, "mamba_proj_bias"),
             ("llama", {"tie_word_embeddings": True}, "lm_head.weight")]
    for arch, change, field in cases:
        folder = tmp_path / f"{arch}-{field}"
        shutil.copytree(tmp_path / arch, folder)
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(UsageError, match=field) as e:
            pretrained.load_model(folder)
        assert "\n" not in str(e.value)


def tiny_llama_with_tokenizer(folder):
    """A tiny Llama directory with its own byte-level BPE tokenizer.json, as the hub gives them."""
    tokenizers = pytest.importorskip("tokenizers", reason="tokenizer.json needs the tokenizers package")
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    tok.train_from_iterator(["the cat sat on the mat. " * 50], tokenizers.trainers.BpeTrainer(
        vocab_size=280, initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    reference_pair("llama", folder, vocab_size=tok.get_vocab_size(), max_position_embeddings=64)
    tok.save(str(folder / "tokenizer.json"))


@pytest.mark.parametrize("style", ["byte-level", "sentencepiece"])
def test_a_tokenizer_json_decodes_token_by_token(style):
    """sample.py prints one token at a time: each must decode to its own bytes, whatever the style
    (GPT-2's byte-level alphabet; SentencePiece's \u2581 for a space and <0xNN> byte tokens)."""
    tokenizers = pytest.importorskip("tokenizers", reason="tokenizer.json needs the tokenizers package")
    if style == "byte-level":
        tok = tokenizers.Tokenizer(tokenizers.models.BPE())
        tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = tokenizers.decoders.ByteLevel()
        alphabet, special = tokenizers.pre_tokenizers.ByteLevel.alphabet(), []
    else:
        tok = tokenizers.Tokenizer(tokenizers.models.BPE(byte_fallback=True, unk_token="<unk>"))
        tok.normalizer = tokenizers.normalizers.Replace(" ", "\u2581")
        tok.decoder = tokenizers.decoders.Sequence([tokenizers.decoders.Replace("\u2581", " "),
                                                    tokenizers.decoders.ByteFallback(), tokenizers.decoders.Fuse()])
        alphabet, special = [], ["<unk>"] + [f"<0x{b:02X}>" for b in range(256)]
    tok.train_from_iterator(["the cat sat on the mat.\n" * 50], tokenizers.trainers.BpeTrainer(
        vocab_size=320, initial_alphabet=alphabet, special_tokens=special, show_progress=False))
    t = data.Tokenizer({"kind": "hf", "json": tok.to_str()})
    text = "the cat sat\non the mat, d\u00e9j\u00e0 vu \u2603"  # bytes the training text never had, too
    ids = t.encode(text)
    assert b"".join(t.decode_bytes([i]) for i in ids).decode() == text == t.decode(ids)


def test_init_from_a_pretrained_directory_samples_and_fine_tunes(tmp_path):
    tiny_llama_with_tokenizer(tmp_path / "llama")
    (tmp_path / "corpus.txt").write_text("the cat sat on the mat. " * 200)
    s = run("sample.py", f"--init_from={tmp_path / 'llama'}", "--prompt=the cat", "--max_new_tokens=6", "--temperature=0")
    assert s.returncode == 0 and s.stdout.startswith("--- sample 1 ---\nthe cat"), s.stderr
    out = tmp_path / "out"
    r = run("train.py", f"--init_from={tmp_path / 'llama'}", f"--dataset={tmp_path / 'corpus.txt'}", "--block_size=32",
            "--batch_size=4", "--max_iters=3", "--eval_interval=3", "--eval_iters=1", f"--data_dir={tmp_path / 'data'}",
            f"--out_dir={out}")
    assert r.returncode == 0, r.stderr
    first, last = [json.loads(l)["val_loss"] for l in (out / "metrics.jsonl").read_text().splitlines() if "val_loss" in l]
    assert last < first  # it learns from where the weights were
    s2 = run("sample.py", f"--ckpt={out}/ckpt_last.pt", "--prompt=the cat", "--max_new_tokens=4")  # the tokenizer travels
    assert s2.returncode == 0 and s2.stdout.startswith("--- sample 1 ---\nthe cat"), s2.stderr


def test_init_from_gpt2_uses_tiktoken_and_an_own_checkpoint_continues_longer(tmp_path):
    reference_pair("gpt2", tmp_path / "gpt2", vocab_size=261, n_positions=32)
    merges = [bytes([i]) for i in range(256)] + [b"th", b"the", b"at", b" the"]  # a stand-in for GPT-2's ranks
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "gpt2.tiktoken").write_text("".join(f"{base64.b64encode(t).decode()} {i}\n" for i, t in enumerate(merges)))
    (tmp_path / "corpus.txt").write_text("the cat sat on the mat. " * 200)
    common = [f"--dataset={tmp_path / 'corpus.txt'}", "--batch_size=2", "--max_iters=2", "--eval_interval=2",
              "--eval_iters=1", f"--data_dir={tmp_path / 'data'}"]
    r = run("train.py", f"--init_from={tmp_path / 'gpt2'}", *common, f"--out_dir={tmp_path / 'a'}")
    assert r.returncode == 0 and "bpe, vocab 261" in r.stdout and "learned positions, gelu_tanh" in r.stdout, r.stderr
    longer = run("train.py", f"--init_from={tmp_path / 'a' / 'ckpt_last.pt'}", "--block_size=64", *common,
                 f"--out_dir={tmp_path / 'b'}")
    assert longer.returncode == 2 and "learned position table has no rows" in longer.stderr
    rope = run("train.py", *TINY_ARGS, *common, "--tokenizer=gpt2", f"--out_dir={tmp_path / 'c'}")
    assert rope.returncode == 0, rope.stderr
    twice = run("train.py", f"--init_from={tmp_path / 'c' / 'ckpt_last.pt'}", "--block_size=64", *common,
                "--tokenizer=gpt2", f"--out_dir={tmp_path / 'd'}")
    assert twice.returncode == 0 and "device cpu" in twice.stdout, twice.stderr


@pytest.mark.parametrize("script", ["sample.py", "train.py"])
def test_init_from_a_bad_directory_is_one_line_and_exit_2(tmp_path, script):
    (tmp_path / "empty").mkdir()
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "config.json").write_text('{"model_type": "bert"}')
    for folder, why in (("empty", "has no config.json"), ("odd", 'model_type="bert"')):
        r = run(script, f"--init_from={tmp_path / folder}")
        assert r.returncode == 2 and why in r.stderr and r.stderr.count("\n") == 1, r.stderr


# ----------------------------------------------------------------------------- train.py, sample.py, data.py
# Sampling filters, resume, tokenizers and data, bad inputs and checkpoints, torchrun

def test_sample_next_filters():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert sample_set(logits, top_k=2) == {0, 1}
    assert sample_set(logits, top_p=0.7) == {0, 1}  # 0.5 < 0.7, 0.5 + 0.3 reaches it
    assert sample_set(logits, top_p=0.4) == {0}
    assert model_transformer.sample_next(logits, temperature=0).item() == 0


def sample_set(logits, **kw):
    torch.manual_seed(0)
    return {model_transformer.sample_next(logits, 1.0, **kw).item() for _ in range(300)}


RESUME = {  # the state a checkpoint must carry: dropout's random stream and accumulation, Mamba, the sigmoid router's bias
    "transformer": ["--dropout=0.1", "--grad_accum=2"],
    "mamba": [],
    "moe": ["--router=sigmoid", "--n_expert=4"],
}


def metrics(out_dir):
    """metrics.jsonl without the wall-clock fields."""
    return [{k: v for k, v in json.loads(l).items() if k not in ("time", "train_time")}
            for l in (out_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("name", RESUME)
def test_resume_continues_from_the_checkpoint_bit_for_bit(name, tmp_path, data_dir, capsys):
    args = [*train_args(name), *RESUME[name], "--max_iters=12", "--eval_interval=4", "--log_interval=1", f"--data_dir={data_dir}"]
    train.main([*args, f"--out_dir={tmp_path / 'a'}"])
    train.main([*args, f"--out_dir={tmp_path / 'b'}", "--stop_at=7"])  # as if killed before step 7: the checkpoint is step 4's
    capsys.readouterr()
    train.main([*args, f"--out_dir={tmp_path / 'b'}", "--resume"])
    logged = [int(l.split()[1]) for l in capsys.readouterr().out.splitlines() if l.startswith("iter ")]  # "iter it+1 | ..."
    assert logged == list(range(5, 13))  # the resumed run took steps 4 to 11 only
    a, b = metrics(tmp_path / "a"), metrics(tmp_path / "b")
    assert len(a) == 12 + 4 and a == b  # every training loss and every evaluation, bit for bit


STOP_ARGS = [*TINY_ARGS, "--dataset=multi_induction", "--task_vocab=6", "--multi_induction_queries=1", "--block_size=8",
             "--lr=1e-2", "--max_iters=60", "--eval_interval=3", "--log_interval=100", "--extrapolate=0"]


def evals_of(out_dir):
    return [row for row in metrics(out_dir) if "val_loss" in row]


@pytest.fixture(scope="module")
def unstopped(tmp_path_factory):
    """The run without --stop_acc or --patience: its evaluations say where each rule must stop."""
    out = tmp_path_factory.mktemp("unstopped")
    train.main([*STOP_ARGS, f"--out_dir={out}"])
    return evals_of(out)


def test_stop_acc_stops_at_the_first_evaluation_that_reaches_it(unstopped, tmp_path):
    accs = [e["val_acc"] for e in unstopped]
    assert unstopped[-1]["stopped"] == "max_iters" and unstopped[-1]["iter"] == 60
    target = max(accs[1:])  # reached first at some evaluation after the start, before the end or at it
    first = next(i for i, a in enumerate(accs) if a >= target)
    assert 0 < first and unstopped[first]["iter"] < 60, accs  # a stop the run would not make anyway
    train.main([*STOP_ARGS, f"--stop_acc={target}", f"--out_dir={tmp_path}"])
    got = evals_of(tmp_path)
    assert got == unstopped[:first] + [{**unstopped[first], "stopped": "solved"}]


def test_patience_stops_once_val_acc_has_not_risen_for_that_many_evaluations(unstopped, tmp_path):
    accs = [e["val_acc"] for e in unstopped]
    patience = 2
    best, since, stop = -1.0, 0, None
    for i, a in enumerate(accs):  # the rule by hand: a strict rise resets the count
        best, since = (a, 0) if a > best else (best, since + 1)
        if since >= patience:
            stop = i
            break
    assert stop is not None and unstopped[stop]["iter"] < 60, accs
    train.main([*STOP_ARGS, f"--patience={patience}", f"--out_dir={tmp_path}"])
    got = evals_of(tmp_path)
    assert got == unstopped[:stop] + [{**unstopped[stop], "stopped": "flat"}]


def test_a_resumed_run_stops_where_the_uninterrupted_one_does(unstopped, tmp_path, capsys):
    args = [*STOP_ARGS, "--patience=2"]
    train.main([*args, f"--out_dir={tmp_path / 'a'}"])
    a = metrics(tmp_path / "a")
    stop = a[-1]["iter"]
    assert a[-1]["stopped"] == "flat" and stop >= 6
    train.main([*args, f"--out_dir={tmp_path / 'b'}", f"--stop_at={stop - 1}"])  # killed between two evaluations
    assert "stopped" not in metrics(tmp_path / "b")[-1]
    train.main([*args, f"--out_dir={tmp_path / 'b'}", "--resume"])  # the count since the best comes from the checkpoint
    assert metrics(tmp_path / "b") == a
    capsys.readouterr()
    train.main([*args, f"--out_dir={tmp_path / 'b'}", "--resume"])  # a stopped run stays stopped
    assert "nothing to continue" in capsys.readouterr().out and metrics(tmp_path / "b") == a


def test_a_run_that_reached_max_iters_goes_on_with_a_longer_max_iters(tmp_path):
    train.main([*STOP_ARGS, "--max_iters=6", f"--out_dir={tmp_path}"])
    assert evals_of(tmp_path)[-1]["stopped"] == "max_iters"
    train.main([*STOP_ARGS, "--max_iters=12", f"--out_dir={tmp_path}", "--resume"])  # only solved or flat stay stopped
    assert evals_of(tmp_path)[-1]["iter"] == 12


def test_bpe_from_a_local_ranks_file_travels_in_the_checkpoint(tmp_path):
    text = "the cat sat on the mat. " * 400
    (tmp_path / "corpus.txt").write_text(text)
    merges = [bytes([i]) for i in range(256)] + [b"th", b"the", b"at", b" the"]
    (tmp_path / "tiny.tiktoken").write_text("".join(f"{base64.b64encode(t).decode()} {i}\n" for i, t in enumerate(merges)))
    out = tmp_path / "out"
    r = run("train.py", *TINY_ARGS, "--max_iters=4", "--eval_interval=2", f"--dataset={tmp_path / 'corpus.txt'}",
            f"--tokenizer={tmp_path / 'tiny.tiktoken'}", f"--data_dir={tmp_path / 'data'}", f"--out_dir={out}")
    assert r.returncode == 0, r.stderr
    assert "bpe, vocab 261" in r.stdout
    (tmp_path / "tiny.tiktoken").unlink()  # sample.py needs only the checkpoint
    s = run("sample.py", f"--ckpt={out}/ckpt_last.pt", "--prompt=the cat", "--max_new_tokens=5", "--device=cpu")
    assert s.returncode == 0 and s.stdout.startswith("--- sample 1 ---\nthe cat"), s.stderr


def test_shakespeare_without_network_says_where_to_put_the_file(tmp_path, capsys, monkeypatch):
    def offline(*args, **kw):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    assert_fails_in_one_line(capsys, train, ["--dataset=shakespeare_char", f"--data_dir={tmp_path}", "--device=cpu"],
                             f"{tmp_path}/tinyshakespeare.txt")
    (tmp_path / "tinyshakespeare.txt").write_text("First Citizen:\nBefore we proceed any further, hear me speak.\n" * 300)
    train.main([*TINY_ARGS, "--dataset=shakespeare_char", f"--data_dir={tmp_path}", "--max_iters=2", "--eval_interval=1",
                f"--out_dir={tmp_path / 'out'}"])
    assert (tmp_path / "shakespeare_char" / "meta.json").is_file()


@pytest.fixture(scope="session")
def hostile(tmp_path_factory):
    """Files a careless or hostile user might hand to train.py and sample.py."""
    d = tmp_path_factory.mktemp("hostile")
    (d / "empty.txt").write_text("")
    (d / "binary.txt").write_bytes(bytes(range(256)) * 20)
    (d / "folder").mkdir()
    (d / "short.txt").write_text("hello world\n")
    (d / "file").write_text("not a directory")
    (d / "syntax.py").write_text("n_layer = (\n")
    (d / "raises.py").write_text("n_layer = 1 / 0\n")
    (d / "unknown.py").write_text("colour = 'blue'\n")
    (d / "wrongtype.py").write_text("n_layer = 'two'\n")
    (d / "garbage.tiktoken").write_text("this is not\na ranks file\n")
    (d / "binary.tiktoken").write_bytes(bytes(range(256)))
    (d / "text.txt").write_text("the cat sat on the mat\n" * 300)
    return d


def assert_one_line_error(r, message):
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def fails(capsys, script, *args, code=2):
    """script.main(argv) in this process, as `python script.py` runs it: bad input reaches cli.die, so
    SystemExit (any other exception is the traceback a user must never see). -> what it wrote on stderr."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        script.main([str(a) for a in args])
    err = capsys.readouterr().err
    assert e.value.code == code, err
    return err


def assert_fails_in_one_line(capsys, script, args, message):
    err = fails(capsys, script, *args)
    assert message in err and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("args,message", [
    (["--dataset=H/empty.txt"], "is empty"),
    (["--dataset=H/binary.txt"], "is not UTF-8 text"),
    (["--dataset=H/folder"], "is a directory"),
    (["--dataset=H/short.txt"], "block_size 256 is longer than the validation split (2 tokens)"),
    (["--dataset=H/text.txt", "--tokenizer=H/garbage.tiktoken"], "is not a tiktoken ranks file"),
    (["--dataset=H/text.txt", "--tokenizer=H/binary.tiktoken"], "tokenizer file H/binary.tiktoken is not UTF-8"),
    (["--dataset=H/text.txt", "--tokenizer=H/none.tiktoken"], "no tiktoken ranks file"),
    (["--device=cuda"] if not torch.cuda.is_available() else ["--device=tpu"], "device"),
    (["--device=cuda:7"], "device cuda:7"),
    (["--device=mps"] if not torch.backends.mps.is_available() else ["--device=mps:1"], "mps"),
    (["--device=gpu"], "device must be auto, cpu, cuda, cuda:N or mps, got 'gpu'"),
    (["--dtype=float16"], "dtype must be auto, float32 or bfloat16, got 'float16'"),
    (["--dtype=garbage"], "dtype must be auto"),
    (["--out_dir=H/file"], "out_dir H/file is a file"),
    (["--data_dir=H/file"], "data_dir H/file is a file"),
    (["H/syntax.py"], "preset H/syntax.py fails: SyntaxError"),
    (["H/raises.py"], "preset H/raises.py fails: ZeroDivisionError"),
    (["H/unknown.py"], "unknown option --colour"),
    (["H/wrongtype.py"], "n_layer expects int, got 'two'"),
    (["H/missing.py"], "no preset file H/missing.py"),
    (["--lr=nan"], "lr > 0"),
    (["--stop_at=-1"], "stop_at"),
    (["--stop_acc=1.5"], "stop_acc must be in [0, 1] (0 = off), got 1.5"),
    (["--patience=-2"], "patience must be >= 0 evaluations (0 = off), got -2"),
    (["--patience=0.5"], "--patience expects int, got '0.5'"),
    (["--beta2=1.5"], "beta1 and beta2 must be in [0, 1)"),
    (["--dropout=1"], "dropout must be in [0, 1), got 1.0"),
    (["--norm_eps=0"], "norm_eps must be positive"),
    (["--model=moe", "--top_k=9"], "top_k must be between 1 and n_expert"),
    (["--model=mamba", "--dt_min=1", "--dt_max=0.1"], "dt_min <= dt_max"),
    (["--model=hybrid", "--layers=Md Xq"], "'Xq' is not a layer"),
    (["--n_head=6", "--n_kv_head=4"], "n_head (6) must be divisible by n_kv_head (4)"),
    (["--d_model=50", "--n_head=4"], "d_model (50) must be divisible by n_head (4)"),
    (["--n_layer=0"], "n_layer must be positive"),
    (["--batch_size=-1"], "batch_size must be positive"),
    (["--block_size=100000"], "longer than the validation split"),
    (["--colour=blue"], "unknown option --colour"),
    (["--n_layer=two"], "--n_layer expects int, got 'two'"),
    (["--model=rnn"], "unknown model 'rnn'"),
    (["--dataset=/no/such/file.txt"], "unknown dataset"),
    (["--tokenizer=nonsense"], "unknown tokenizer 'nonsense'"),
    (["--resume", "--out_dir=/nonexistent/dir"], "no checkpoint at /nonexistent/dir/ckpt_last.pt"),
])
def test_bad_input_exits_2_with_one_line(args, message, data_dir, hostile, capsys):
    args = [a.replace("H/", f"{hostile}/") for a in args]
    if not any(a.startswith("--data_dir") for a in args):
        args.append(f"--data_dir={data_dir}")
    assert_fails_in_one_line(capsys, train, ["--device=cpu", *args], message.replace("H/", f"{hostile}/"))


def test_bad_input_exits_2_from_the_command_line(hostile, data_dir):
    """The real exit path of both scripts, once each (the cases above call main() in this process)."""
    assert_one_line_error(run("train.py", f"--dataset={hostile / 'binary.txt'}", f"--data_dir={data_dir}", "--device=cpu"),
                          "is not UTF-8 text")
    assert_one_line_error(run("sample.py", f"--ckpt={hostile / 'none.pt'}", "--device=cpu"), "no checkpoint at")


def test_bad_checkpoints_get_clear_errors(tmp_path, data_dir, hostile, capsys):
    out = tmp_path / "out"
    train.main([*TINY_ARGS, "--max_iters=2", "--eval_interval=1", f"--out_dir={out}", f"--data_dir={data_dir}"])
    saved = {p.name: p.read_bytes() for p in out.iterdir()}
    good = saved["ckpt_last.pt"]
    ckpt = torch.load(out / "ckpt_last.pt", weights_only=True)
    (tmp_path / "trunc.pt").write_bytes(good[: len(good) // 2])
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    torch.save({**ckpt, "model_name": "rnn"}, tmp_path / "rnn.pt")
    torch.save({**ckpt, "model_config": {**ckpt["model_config"], "warp": 9}}, tmp_path / "newer.pt")  # another version
    torch.save({**ckpt, "model_config": {k: v for k, v in ckpt["model_config"].items() if k != "pos"}}, tmp_path / "older.pt")
    torch.save({**ckpt, "model_config": "n_layer=1"}, tmp_path / "flat.pt")
    torch.save({**ckpt, "model": {k: v for k, v in ckpt["model"].items() if ".0." not in k}}, tmp_path / "keys.pt")
    torch.save({**ckpt, "tokenizer": {"kind": "char"}}, tmp_path / "tok.pt")
    ok = f"--ckpt={out / 'ckpt_last.pt'}"
    for args, message in [
            *(([f"--ckpt={tmp_path / name}.pt"], message) for name, message in [
                ("trunc", "not a readable checkpoint"), ("other", "not a checkpoint of this project"),
                ("rnn", "holds a 'rnn' model"), ("newer", "unknown Config fields [warp]"), ("older", "missing [pos]"),
                ("flat", "model_config is a str"), ("keys", "Missing key(s)"), ("tok", "does not match model_transformer.py"),
                ("missing", "no checkpoint at")]),
            ([ok, "--device=cuda:7"], "device cuda:7"), ([ok, f"--prompt_file={hostile / 'binary.txt'}"], "is not UTF-8 text"),
            ([ok, f"--prompt_file={hostile / 'folder'}"], "is not a file"), ([ok, "--top_p=0"], "top_p must be in (0, 1]"),
            ([ok, "--prompt=\u65e5\u672c"], "outside the vocabulary")]:
        assert_fails_in_one_line(capsys, sample, ["--device=cpu", *args], message)
    # a failing --resume leaves everything that was saved as it was
    resume = [*TINY_ARGS, "--resume", f"--out_dir={out}", f"--data_dir={data_dir}"]
    for args, message in [(["--n_layer=2"], "--n_layer=2 differs from the checkpoint's n_layer=1"),
                          (["--model=moe"], "holds a transformer model, not moe"),
                          ([f"--dataset={hostile / 'text.txt'}"], "trained with another tokenizer"),
                          ([f"--dataset={hostile / 'binary.txt'}"], "is not UTF-8 text"), (["--device=cuda:7"], "device cuda:7"),
                          (["--block_size=100000"], "differs from the checkpoint's block_size=32")]:
        assert_fails_in_one_line(capsys, train, [*resume, *args], message)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == saved
    stripped = tmp_path / "stripped"
    stripped.mkdir()
    torch.save({k: v for k, v in ckpt.items() if k != "optimizer"}, stripped / "ckpt_last.pt")
    assert_fails_in_one_line(capsys, train, [*TINY_ARGS, "--resume", f"--out_dir={stripped}", f"--data_dir={data_dir}"],
                             "cannot be resumed (no optimizer)")
    # a non-finite loss stops the run (exit code 1) and leaves the good checkpoint untouched
    err = fails(capsys, train, *TINY_ARGS, "--max_iters=40", "--resume", "--lr=1e30", "--grad_clip=0", f"--out_dir={out}",
                f"--data_dir={data_dir}", code=1)
    assert "loss is nan" in err or "loss is inf" in err, err
    assert (out / "ckpt_last.pt").read_bytes() == good


def test_a_second_run_into_a_used_out_dir_loses_nothing(tmp_path, data_dir):
    out = tmp_path / "out"
    args = ["train.py", *TINY_ARGS, "--max_iters=2", "--eval_interval=1", f"--out_dir={out}", f"--data_dir={data_dir}"]
    assert run(*args).returncode == 0
    saved = {p.name: p.read_bytes() for p in out.iterdir()}
    assert_one_line_error(run(*args), "already holds a run (ckpt_last.pt, ckpt_best.pt): continue it with --resume=True")
    assert_one_line_error(run(*args, "--resume", "--overwrite=True"), "say one of them")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == saved  # checkpoints and metrics.jsonl intact
    r = run(*args, "--overwrite=True", "--seed=7")
    assert r.returncode == 0, r.stderr
    assert (out / "ckpt_last.pt").read_bytes() != saved["ckpt_last.pt"]


def test_out_of_memory_is_one_line_and_keeps_the_checkpoint(tmp_path, data_dir, monkeypatch, capsys):
    # sizes past the 128 TiB a process can address fail at allocation on any machine, without using any memory
    assert_one_line_error(run("train.py", "--d_model=1000000000000", "--n_head=1", "--n_kv_head=1", f"--data_dir={data_dir}",
                              f"--out_dir={tmp_path / 'huge'}"), "out of memory building the transformer model on cpu: lower")
    out = tmp_path / "out"
    args = [*TINY_ARGS, "--max_iters=2", "--eval_interval=1", f"--out_dir={out}", f"--data_dir={data_dir}"]
    assert run("train.py", *args).returncode == 0
    saved = {p.name: p.read_bytes() for p in out.iterdir() if p.suffix == ".pt"}
    assert_one_line_error(run("train.py", *args, "--resume", "--max_iters=4", "--batch_size=100000000000000"),
                          "out of memory in a training step (100000000000000 x 32 tokens per batch on cpu): lower --batch_size")
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.suffix == ".pt"} == saved
    # a GPU's error, injected: the evaluation stops the same way
    import train

    def no_memory(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
    monkeypatch.setattr(model_transformer.Model, "forward", no_memory)
    with pytest.raises(SystemExit) as stop:
        train.main([*args, "--overwrite=True"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.startswith("error: out of memory evaluating (4 x 32 tokens per batch on cpu)"), err
    assert len(err.strip().splitlines()) == 1 and (out / "ckpt_last.pt").read_bytes() == saved["ckpt_last.pt"]


# torchrun runs train.main through this, which saves each rank's weights as its process group ends
RANK_WEIGHTS = """
import sys, torch, torch.distributed as dist
import train
models, destroy = [], dist.destroy_process_group
train.DistributedDataParallel = lambda m, **kw: models.append(m) or torch.nn.parallel.DistributedDataParallel(m, **kw)
dist.destroy_process_group = lambda: (torch.save(models[0].state_dict(), sys.argv[1] + f"/rank{dist.get_rank()}.pt"), destroy())
train.main(sys.argv[2:])
"""


def torchrun(tmp_path, out, *args):
    (tmp_path / "rank_weights.py").write_text(RANK_WEIGHTS)
    p = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(tmp_path / "rank_weights.py"), str(out), *args, f"--out_dir={out}"],
                         cwd=REPO, env={**ENV, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, start_new_session=True)
    try:
        stdout, stderr = p.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)  # a hung collective must not leave workers behind
        raise
    assert p.returncode == 0, stderr[-2000:]
    return stdout


def test_torchrun_ranks_stay_equal_and_equal_one_process_with_accumulation(tmp_path, data_dir):
    """Two processes (gloo), stopped and resumed, against one process with grad_accum=2 on the same batches."""
    args = [*TINY_ARGS, "--max_iters=6", "--eval_interval=3", "--log_interval=1", f"--data_dir={data_dir}"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the workers (OMP_NUM_THREADS=1): every matmul blocked, so rounded, the same
    try:
        train.main([*args, "--grad_accum=2", f"--out_dir={tmp_path / 'one'}"])
    finally:
        torch.set_num_threads(threads)
    two = tmp_path / "two"
    torchrun(tmp_path, two, *args, "--stop_at=5")  # as if killed before step 5: the checkpoint is step 3's
    out = torchrun(tmp_path, two, *args, "--resume")
    assert "2 processes" in out and out.count("eval 6 |") == 1  # rank 0 alone logs
    assert [int(l.split()[1]) for l in out.splitlines() if l.startswith("iter ")] == [4, 5, 6]  # from step 3 on
    ranks = [torch.load(two / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    one, saved = (torch.load(d / "ckpt_last.pt", weights_only=True)["model"] for d in (tmp_path / "one", two))
    for k in one:
        assert torch.equal(ranks[0][k], ranks[1][k]) and torch.equal(ranks[0][k], saved[k]), k  # all-reduced
        # (g0 + g1) / 2 against g0 / 2 + g1 / 2: halving is exact in binary floating point, so bit for bit
        assert torch.equal(saved[k], one[k]), k
    assert metrics(tmp_path / "one") == metrics(two)
