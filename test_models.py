import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton kernels run on the CPU in tests; set before kernels import

import base64
import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import kernels
import model_moe
import model_transformer

REPO = Path(__file__).resolve().parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TINY = ["--n_layer=1", "--d_model=32", "--n_head=2", "--n_kv_head=1", "--block_size=32", "--batch_size=4",
        "--eval_iters=2", "--warmup_iters=2"]


def run(script, *args, timeout=120):
    return subprocess.run([sys.executable, str(REPO / script), *args], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("data"))


# ----------------------------------------------------------------------------- model_transformer

VARIANTS = [  # every position scheme, MHA/GQA/MQA, both norms, pre/post, both ffns, both attention paths
    dict(pos="rope", n_kv_head=2),
    dict(pos="alibi", n_kv_head=1, ffn="gelu", norm="layernorm", prenorm=False, flash=False),
    dict(pos="learned", n_kv_head=4, ffn="gelu", norm="layernorm", bias=True),
    dict(pos="sinusoidal", n_kv_head=2, prenorm=False, flash=False),
    dict(pos="none", n_kv_head=1, ffn="gelu"),
    dict(pos="alibi", n_kv_head=4, tie_embeddings=False),
    dict(pos="rope", n_kv_head=1, flash=False, norm="layernorm"),
]
ID = lambda v: "-".join(f"{k}={x}" for k, x in v.items())


def tiny_transformer(**kw):
    torch.manual_seed(0)
    cfg = model_transformer.Config(**{**dict(vocab_size=61, block_size=40, d_model=48, n_layer=2, n_head=4), **kw})
    return model_transformer.Model(cfg).eval()


def test_shapes_and_initial_loss():
    m = tiny_transformer()
    idx, targets = torch.randint(0, 61, (3, 17)), torch.randint(0, 61, (3, 17))
    logits, loss = m(idx, targets)
    assert logits.shape == (3, 17, 61) and logits.dtype == torch.float32
    assert abs(loss.item() - math.log(61)) < 0.1  # small init: predictions start near uniform


@pytest.mark.parametrize("variant", VARIANTS, ids=ID)
def test_causal(variant):
    m = tiny_transformer(**variant)
    idx = torch.randint(0, 61, (2, 30))
    changed = idx.clone()
    changed[:, 17] = (changed[:, 17] + 1) % 61
    a, b = m(idx)[0], m(changed)[0]
    assert torch.equal(a[:, :17], b[:, :17])  # nothing before t may see token t
    assert not torch.allclose(a[:, 17:], b[:, 17:])


@pytest.mark.parametrize("variant", VARIANTS, ids=ID)
def test_cached_generation_equals_full_forward(variant):
    m = tiny_transformer(**variant)
    prompt = torch.randint(0, 61, (2, 9))
    out = torch.cat([prompt, *m.generate(prompt, 25, temperature=0)], dim=1)  # (2, 34) < block_size
    full = m(out[:, :-1])[0]  # (2, 33, V)
    assert torch.equal(full[:, 8:].argmax(-1), out[:, 9:])  # greedy tokens identical
    cache = m.new_cache(2)
    steps = [m(out[:, :9], cache=cache)[0][:, -1]] + [m(out[:, t:t + 1], cache=cache)[0][:, -1] for t in range(9, 33)]
    torch.testing.assert_close(torch.stack(steps, 1), full[:, 8:], atol=1e-5, rtol=1e-5)
    assert cache.k.shape[2] == variant["n_kv_head"]  # the cache holds only the K/V heads


def test_chunked_prefill_matches_full_forward():
    m = tiny_transformer(pos="alibi")
    idx = torch.randint(0, 61, (2, 30))
    cache = m.new_cache(2)
    chunks = [m(idx[:, a:b], cache=cache)[0] for a, b in ((0, 7), (7, 8), (8, 30))]
    torch.testing.assert_close(torch.cat(chunks, 1), m(idx)[0], atol=1e-5, rtol=1e-5)


def test_generation_slides_past_block_size():
    m = tiny_transformer(pos="learned", block_size=16)
    out = list(m.generate(torch.randint(0, 61, (1, 20)), 40, temperature=1.0, top_k=5, top_p=0.9))
    assert len(out) == 40 and all(t.shape == (1, 1) and 0 <= t.item() < 61 for t in out)


@pytest.mark.parametrize("variant", [dict(pos="alibi", n_kv_head=2), dict(pos="rope", n_kv_head=1)], ids=ID)
def test_explicit_attention_equals_fast_path(variant):
    fast = tiny_transformer(**variant, flash=True)
    slow = tiny_transformer(**variant, flash=False)
    slow.load_state_dict(fast.state_dict())
    idx, targets = torch.randint(0, 61, (2, 23)), torch.randint(0, 61, (2, 23))
    grads = []
    for m in (fast, slow):
        _, loss = m(idx, targets)
        grads.append(torch.autograd.grad(loss, list(m.parameters())))
        grads[-1] = (loss.detach(),) + grads[-1]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


def test_sample_next_filters():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert sample_set(logits, top_k=2) == {0, 1}
    assert sample_set(logits, top_p=0.7) == {0, 1}  # 0.5 < 0.7, 0.5 + 0.3 reaches it
    assert sample_set(logits, top_p=0.4) == {0}
    assert model_transformer.sample_next(logits, temperature=0).item() == 0


def sample_set(logits, **kw):
    torch.manual_seed(0)
    return {model_transformer.sample_next(logits, 1.0, **kw).item() for _ in range(300)}


def test_swiglu_matches_gelu_parameter_count():
    gelu = tiny_transformer(ffn="gelu", d_model=96).num_params()
    swiglu = tiny_transformer(ffn="swiglu", d_model=96).num_params()
    assert abs(swiglu - gelu) / gelu < 0.01


def test_config_rejects_impossible_values():
    for kw, msg in [(dict(n_head=6, n_kv_head=4), "divisible by n_kv_head"), (dict(d_model=50, n_head=4), "divisible by n_head"),
                    (dict(n_layer=0), "n_layer must be positive"), (dict(pos="xpos"), "pos must be one of"),
                    (dict(d_model=36, n_head=4, n_kv_head=2), "even head dim")]:
        with pytest.raises(ValueError, match=msg):
            model_transformer.Config(**kw)


def test_init_and_optimizer_groups():
    m = tiny_transformer(n_layer=8, d_model=192, n_head=4, bias=True, norm="layernorm")
    std = lambda name: dict(m.named_parameters())[name].std().item()
    assert abs(std("blocks.0.attn.qkv.weight") - 0.02) < 0.002
    assert abs(std("blocks.0.attn.out_proj.weight") - 0.02 / math.sqrt(16)) < 0.0007  # scaled for depth
    decay, keep = m.optim_groups(0.1)
    assert decay["weight_decay"] == 0.1 and keep["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in keep["params"])
    assert len(decay["params"]) + len(keep["params"]) == len(list(m.parameters()))  # tied weight counted once


def test_tiny_batch_overfits():
    torch.manual_seed(0)
    m = tiny_transformer().train()
    x = torch.randint(0, 61, (4, 24))
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    for _ in range(150):
        _, loss = m(x[:, :-1], x[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1


# ----------------------------------------------------------------------------- train.py and sample.py


def test_train_and_sample_end_to_end(tmp_path, data_dir):
    out = tmp_path / "out"
    r = run("train.py", *TINY, "--max_iters=30", "--eval_interval=15", "--log_interval=10",
            f"--out_dir={out}", f"--data_dir={data_dir}")
    assert r.returncode == 0, r.stderr
    for text in ("parameters", "MFLOPs per token", "tokens per parameter (Chinchilla-optimal: ~20)",
                 "eval 30 | train", "ms/iter", "tok/s", "eta"):
        assert text in r.stdout
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in rows if "val_loss" in r] == [0, 15, 30]
    assert rows[-1]["val_loss"] < rows[0]["val_loss"]
    s = run("sample.py", f"--ckpt={out}/ckpt_best.pt", "--prompt=def ", "--max_new_tokens=20", "--num_samples=2")
    assert s.returncode == 0, s.stderr
    assert s.stdout.count("def ") >= 2 and "tokens/s" in s.stderr
    bad = run("sample.py", f"--ckpt={out}/ckpt_best.pt", "--prompt=\u65e5\u672c")
    assert bad.returncode == 2 and "outside the vocabulary" in bad.stderr and "Traceback" not in bad.stderr


def test_resume_after_kill_matches_uninterrupted_run(tmp_path, data_dir):
    args = [*TINY, "--max_iters=160", "--eval_interval=40", "--log_interval=1000", "--dropout=0.1",
            f"--data_dir={data_dir}"]
    whole = run("train.py", *args, f"--out_dir={tmp_path / 'a'}")
    assert whole.returncode == 0, whole.stderr
    out = tmp_path / "b"
    p = subprocess.Popen([sys.executable, str(REPO / "train.py"), *args, f"--out_dir={out}"], cwd=REPO, env=ENV,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics, deadline = out / "metrics.jsonl", time.time() + 60
    while time.time() < deadline and p.poll() is None:  # kill once it is past the checkpoint at 40
        if metrics.is_file() and any(json.loads(l)["iter"] >= 50 for l in metrics.read_text().splitlines() if l):
            break
        time.sleep(0.005)
    assert p.poll() is None, "the run ended before it could be killed"
    p.send_signal(signal.SIGKILL)
    p.wait()
    resumed = run("train.py", *args, f"--out_dir={out}", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    rows = lambda path: [{k: v for k, v in json.loads(l).items() if k != "time"} for l in path.read_text().splitlines()]
    a, b = rows(tmp_path / "a" / "metrics.jsonl"), rows(metrics)
    assert len(a) == 160 + 5 and a == b  # every training loss and every evaluation, bit for bit


def test_bpe_from_a_local_ranks_file_travels_in_the_checkpoint(tmp_path):
    text = "the cat sat on the mat. " * 400
    (tmp_path / "corpus.txt").write_text(text)
    merges = [bytes([i]) for i in range(256)] + [b"th", b"the", b"at", b" the"]
    (tmp_path / "tiny.tiktoken").write_text("".join(f"{base64.b64encode(t).decode()} {i}\n" for i, t in enumerate(merges)))
    out = tmp_path / "out"
    r = run("train.py", *TINY, "--max_iters=4", "--eval_interval=2", f"--dataset={tmp_path / 'corpus.txt'}",
            f"--tokenizer={tmp_path / 'tiny.tiktoken'}", f"--data_dir={tmp_path / 'data'}", f"--out_dir={out}")
    assert r.returncode == 0, r.stderr
    assert "bpe, vocab 261" in r.stdout
    (tmp_path / "tiny.tiktoken").unlink()  # sample.py needs only the checkpoint
    s = run("sample.py", f"--ckpt={out}/ckpt_last.pt", "--prompt=the cat", "--max_new_tokens=5")
    assert s.returncode == 0 and s.stdout.startswith("--- sample 1 ---\nthe cat"), s.stderr


def test_shakespeare_without_network_says_where_to_put_the_file(tmp_path):
    offline = {**ENV, "https_proxy": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9"}  # a dead proxy
    r = subprocess.run([sys.executable, str(REPO / "train.py"), "--dataset=shakespeare_char", f"--data_dir={tmp_path}"],
                       cwd=REPO, env=offline, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and f"{tmp_path}/tinyshakespeare.txt" in r.stderr and "Traceback" not in r.stderr
    (tmp_path / "tinyshakespeare.txt").write_text("First Citizen:\nBefore we proceed any further, hear me speak.\n" * 300)
    r = run("train.py", *TINY, "--dataset=shakespeare_char", f"--data_dir={tmp_path}", "--max_iters=2",
            "--eval_interval=1", f"--out_dir={tmp_path / 'out'}")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "shakespeare_char" / "meta.json").is_file()


@pytest.mark.parametrize("args,message", [
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
def test_bad_input_exits_2_with_one_line(args, message, data_dir):
    r = run("train.py", *args, f"--data_dir={data_dir}")
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_bad_checkpoints_get_clear_errors(tmp_path, data_dir):
    out = tmp_path / "out"
    assert run("train.py", *TINY, "--max_iters=2", "--eval_interval=1", f"--out_dir={out}", f"--data_dir={data_dir}").returncode == 0
    good = (out / "ckpt_last.pt").read_bytes()
    (tmp_path / "trunc.pt").write_bytes(good[: len(good) // 2])
    r = run("sample.py", f"--ckpt={tmp_path / 'trunc.pt'}")
    assert r.returncode == 2 and "not a readable checkpoint" in r.stderr
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    r = run("sample.py", f"--ckpt={tmp_path / 'other.pt'}")
    assert r.returncode == 2 and "not a checkpoint of this project" in r.stderr
    r = run("train.py", *TINY, "--n_layer=2", "--resume", f"--out_dir={out}", f"--data_dir={data_dir}")
    assert r.returncode == 2 and "--n_layer=2 differs from the checkpoint's n_layer=1" in r.stderr
    # a non-finite loss stops the run and leaves the good checkpoint untouched
    r = run("train.py", *TINY, "--max_iters=40", "--resume", "--lr=1e30", "--grad_clip=0", f"--out_dir={out}",
            f"--data_dir={data_dir}")
    assert r.returncode == 1 and ("loss is nan" in r.stderr or "loss is inf" in r.stderr), r.stderr
    assert (out / "ckpt_last.pt").read_bytes() == good


def test_torchrun_two_processes(tmp_path, data_dir):
    p = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(REPO / "train.py"), *TINY, "--max_iters=6", "--eval_interval=3", "--log_interval=2",
                          f"--out_dir={tmp_path}", f"--data_dir={data_dir}"],
                         cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        out, err = p.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)  # a hung collective must not leave workers behind
        raise
    assert p.returncode == 0, err[-2000:]
    assert "2 processes" in out and out.count("eval 6 |") == 1  # rank 0 alone logs
    assert (tmp_path / "ckpt_last.pt").is_file()


# ---- model_moe

MOE_VARIANTS = [  # router, paths, shared and fine-grained experts, dense layers between, GELU experts
    dict(),
    dict(expert_path="loop", router="sigmoid"),
    dict(n_expert=16, top_k=4, d_expert=32, n_shared=1, moe_every=2, moe_offset=1),
    dict(ffn="gelu", norm_topk=False, n_kv_head=1, pos="alibi"),
]


def tiny_moe(**kw):
    torch.manual_seed(0)
    cfg = model_moe.Config(**{**dict(vocab_size=61, block_size=40, d_model=48, n_layer=2, n_head=4), **kw})
    return model_moe.Model(cfg).eval()


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


@pytest.mark.parametrize("variant", MOE_VARIANTS, ids=ID)
def test_moe_causal_and_prefix_consistent(variant):
    m = tiny_moe(**variant)
    idx = torch.randint(0, 61, (2, 30))
    changed = idx.clone()
    changed[:, 17:] = torch.randint(0, 61, (2, 13))
    a, b = m(idx)[0], m(changed)[0]
    torch.testing.assert_close(a[:, :17], b[:, :17], atol=0, rtol=0)  # nothing before t may see token t
    assert not torch.allclose(a[:, 17:], b[:, 17:])
    torch.testing.assert_close(m(idx[:, :12])[0], a[:, :12])  # a prefix alone gives the same outputs


def test_capacity_factor_breaks_causality_and_prefix_consistency():
    m = tiny_moe(capacity_factor=1.0)
    idx = torch.randint(0, 61, (1, 40))
    changed = idx.clone()
    changed[:, 20:] = torch.randint(0, 61, (1, 20))
    a, b = m(idx)[0], m(changed)[0]
    assert m.stats()["moe_drop"] > 0
    assert not torch.allclose(a[:, :20], b[:, :20])  # later tokens pushed earlier ones out of an expert
    assert not torch.allclose(m(idx[:, :20])[0], a[:, :20])  # a prefix has another capacity


@pytest.mark.parametrize("variant", MOE_VARIANTS, ids=ID)
def test_moe_cached_generation_equals_full_forward(variant):
    m = tiny_moe(**variant)
    prompt = torch.randint(0, 61, (2, 9))
    out = torch.cat([prompt, *m.generate(prompt, 25, temperature=0)], dim=1)  # (2, 34)
    full = m(out[:, :-1])[0]  # (2, 33, V)
    assert torch.equal(full[:, 8:].argmax(-1), out[:, 9:])
    cache = m.new_cache(2)
    steps = [m(out[:, :9], cache=cache)[0][:, -1]] + [m(out[:, t:t + 1], cache=cache)[0][:, -1] for t in range(9, 33)]
    torch.testing.assert_close(torch.stack(steps, 1), full[:, 8:], atol=1e-5, rtol=1e-5)


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


def test_moe_counts_active_parameters_and_flops():
    dense = tiny_transformer(d_ff=64)
    moe = tiny_moe(d_ff=64, n_expert=8, top_k=2, d_expert=32)  # 2 experts of 32 per token = one dense ffn of 64
    router = 2 * 8 * 48
    assert moe.num_params(active=True) == dense.num_params() + router
    assert moe.num_params() == dense.num_params() + router + 2 * 6 * 3 * 48 * 32  # 6 more experts per layer
    assert moe.flops_per_token() == dense.flops_per_token() + 6 * router


def test_moe_config_rejects_impossible_values():
    for kw, msg in [(dict(top_k=9), "top_k must be between 1 and n_expert"), (dict(router="hash"), "router must be one of"),
                    (dict(d_expert=20), "divisible by 8"), (dict(moe_every=2, moe_offset=2), "moe_offset < moe_every")]:
        with pytest.raises(ValueError, match=msg):
            model_moe.Config(**kw)
    model_moe.Config(d_expert=20, expert_path="loop")


def test_moe_tiny_batch_overfits():
    torch.manual_seed(0)
    m = tiny_moe(n_expert=4, top_k=2).train()
    x = torch.randint(0, 61, (4, 24))
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    for _ in range(150):
        _, loss = m(x[:, :-1], x[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert m.aux["ce"] < 0.1


def test_train_py_prints_expert_statistics(tmp_path, data_dir):
    r = run("train.py", *TINY, "--model=moe", "--n_expert=4", "--max_iters=6", "--eval_interval=3", "--log_interval=3",
            f"--out_dir={tmp_path}", f"--data_dir={data_dir}")
    assert r.returncode == 0, r.stderr
    assert "active)" in r.stdout and "top-2 of 4 experts" in r.stdout
    evals = [l for l in r.stdout.splitlines() if l.startswith("eval ")]
    assert len(evals) == 3 and all("moe_ent" in l and "moe_vio" in l and "moe_dead" in l for l in evals)
