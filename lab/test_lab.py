import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton kernels run on the CPU in tests; set before kernels import

import json
import math
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch

import data
import kernels
from lab import bench_attention, bench_scan, scaling
from lab.verdicts import VERDICTS

# The lab's tests: the experiments' fits, command line and quick pages; the benchmarks' baseline and failure
# handling; gpu_check.sh's preflight. Every subprocess runs this interpreter (sys.executable); every
# training one on the CPU (--device=cpu), without the Triton interpreter that test_models.py switches on.

REPO = Path(__file__).resolve().parent.parent
ENV = {**{k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}, "OMP_NUM_THREADS": "1"}
TRITON_DEVICE = "cpu" if kernels.INTERPRET else "cuda"
needs_triton = pytest.mark.skipif(not kernels.INTERPRET and not torch.cuda.is_available(),
                                  reason="Triton needs TRITON_INTERPRET=1 or a CUDA GPU")


def experiments(*args, timeout=120):
    """python -m lab.experiments ARGS, its training runs on the CPU."""
    return subprocess.run([sys.executable, "-m", "lab.experiments", *args, "--device=cpu"], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("data"))


# ----------------------------------------------------------------------------- experiments
# the fits, bad input, and each experiment's quick page

def test_experiment_fits_recover_known_curves():
    xs = [1, 2, 3, 4, 5]
    a, b, c = scaling.fit_parabola(xs, [2 * (x - 3.3) ** 2 + 1 for x in xs])
    assert abs(-b / (2 * a) - 3.3) < 1e-9 and abs(a - 2) < 1e-9
    gen = torch.Generator().manual_seed(0)
    cs = [1e11 * 3 ** i for i in range(4)]
    noise = (1 + 0.01 * torch.randn(4, generator=gen)).tolist()
    exponent, k = scaling.fit_power_law(cs, [7 * c ** 0.5 * e for c, e in zip(cs, noise)])
    assert abs(exponent - 0.5) < 0.02 and 5 < k < 10


def test_experiments_bad_input(tmp_path):
    bad = experiments("nope", f"--out={tmp_path}")
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error: unknown experiment 'nope'")
    bad = experiments("recall", "--seeds=0", f"--out={tmp_path}")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1


def quick_experiment(name, tmp_path):
    """python -m lab.experiments NAME --quick into tmp_path: the page, its picture (parsed) and the page's table rows."""
    ddir = tmp_path / "data"
    ddir.mkdir(exist_ok=True)
    (ddir / "tinyshakespeare.txt").write_text(data.builtin_text()[:300_000])  # a stand-in: no network in tests
    r = experiments(name, "--quick", "--seeds=1", f"--out={tmp_path}", f"--data_dir={ddir}", timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    page = (tmp_path / f"{name}.md").read_text()
    assert ET.parse(tmp_path / f"{name}.svg").getroot().tag.endswith("svg")
    assert f"![{name}]({name}.svg)" in page and "python train.py" in page
    return page, [[c.strip() for c in l.strip("|").split("|")] for l in page.splitlines() if l.startswith("| ")]


def claim_words(page):
    """The verdict words of a page's claim lines."""
    return [line.rsplit("-> **", 1)[1].rstrip("*") for line in page.splitlines() if line.startswith("- ") and "-> **" in line]


def test_experiment_recall_quick(tmp_path):
    page, rows = quick_experiment("recall", tmp_path)
    table = {r[0]: r for r in rows}
    assert {"transformer", "hybrid Md Ad", "no-recall baseline"} <= table.keys()
    assert 0 < float(table["no-recall baseline"][3]) < 0.2  # multi_induction: 1 / (16 - 4)
    for m in ("transformer", "hybrid Md Ad"):
        assert 0 <= float(table[m][3].split()[0]) <= 1 and 0 <= float(table[m][5].split()[0]) <= 1  # acc, @4x
        assert table[m][4] == "6 max_iters"  # the steps each run used, and why it stopped
    assert claim_words(page) == ["not measured"] * 3  # one seed; Mamba not in quick mode
    assert (tmp_path / "recall.svg").read_text().count("<rect") >= 4  # background + three bars


def test_experiment_mqar_quick(tmp_path):
    page, rows = quick_experiment("mqar", tmp_path)
    base = next(r for r in rows if r[0] == "no-recall baseline")  # 2 and 4 pairs
    assert float(base[3]) > float(base[4]) > 0.2  # fewer values: the bag rule does better
    assert ["transformer", "6 max_iters", "6 max_iters"] in rows  # the steps table
    assert len(claim_words(page)) == 4 and set(claim_words(page)) == {"not measured"}
    svg = (tmp_path / "mqar.svg").read_text()
    assert svg.count("<polyline") == 3 and "key-value pairs" in svg
    assert (tmp_path / "runs" / "recall").is_dir()  # recall and mqar share one run folder


def test_experiment_mqar_state_quick(tmp_path):
    page, rows = quick_experiment("mqar_state", tmp_path)
    table = {r[0]: r for r in rows}
    assert [table[f"Mamba, d_state {d}"][1] for d in (1, 4)] == ["64", "256"]  # 2 layers x 2 * 16 x d_state
    assert table["Transformer (KV cache at 32 tokens)"][1] == "2,048"  # 2 layers x K, V x 16 x 32 tokens
    assert all(0 <= float(table["Mamba, d_state 4"][k].split()[0]) <= 1 for k in (3, 4))
    assert "The largest pair count each state size solves" in page and len(claim_words(page)) == 3
    svg = (tmp_path / "mqar_state.svg").read_text()
    assert "state size (numbers)" in svg and "KV cache" in svg


def test_experiment_induction_heads_quick(tmp_path):
    page, rows = quick_experiment("induction_heads", tmp_path)
    table = {r[0]: r for r in rows}
    assert {"transformer", "mamba", "no-recall baseline", "paper: Mamba", "paper: MHA-RoPE"} <= table.keys()
    assert all(0 <= float(table[m][k].split()[0]) <= 1 for m in ("transformer", "mamba") for k in (5, 6, 7))  # 16, 32, 64
    assert table["paper: Mamba"][4] == "204,800" and "of the paper's 204,800 x 8" in page
    assert "a budget result, not a measurement" in page and len(claim_words(page)) == 2
    assert (tmp_path / "induction_heads.svg").read_text().count("<polyline") >= 2 + 3  # curves, and accuracy by length


def test_experiment_moe_quick(tmp_path):
    page, rows = quick_experiment("moe", tmp_path)
    table = {r[0]: r for r in rows}
    assert {"dense", "MoE 8 x top-1", "MoE 16 x top-2, half-width"} <= table.keys()
    dense_active, moe_active = (int(table[k][2].replace(",", "")) for k in ("dense", "MoE 8 x top-1"))
    assert abs(moe_active - dense_active) < 0.05 * dense_active  # equal active parameters (plus the router)
    assert 0 < float(table["MoE 8 x top-1"][7].split()[0]) <= 1 and table["dense"][7] == ""  # load entropy
    assert (tmp_path / "moe.svg").read_text().count("<polyline") == 3 + 2 + 2


def test_experiment_scaling_quick(tmp_path):
    page, rows = quick_experiment("scaling", tmp_path)
    loss_rows = [r for r in rows if r[0] in ("2e+08", "6e+08") and len(r) == 5 and r[2].isdigit()]
    optima = [r for r in rows if r[0] in ("2e+08", "6e+08") and r[1].endswith("of 1")]
    assert len(loss_rows) == 2 * 3 and len(optima) == 2  # 2 budgets x 3 sizes, then one optimum per budget
    assert all(float(r[3].split()[0].replace(",", "")) > 0 for r in optima)  # the best measured point
    assert "N_opt, Kaplan's counting" in page and "20 tokens per parameter" in page
    assert "counting N and C Kaplan's way gives a larger N_opt exponent" in page  # a claim line, one seed: not measured
    assert "-> **not measured**" in page


def test_experiment_architectures_quick(tmp_path):
    page, rows = quick_experiment("architectures", tmp_path)
    for m in ("transformer", "moe", "mamba", "hybrid"):
        cost, learned = [r for r in rows if r[0] == m]
        assert cost[7].endswith("MiB") and float(cost[6].replace(",", "")) > 0  # decode speed and cache
        assert 0 < float(learned[1].split()[0]) < 10  # text loss on the fixed batches
    assert "decode tok/s @256" in page and page.count("-> **not measured**") == 3  # one seed: no verdict
    assert (tmp_path / "architectures.svg").read_text().count("<polyline") == 4


def quick_page(name, rows, tmp_path, data_dir, *args):
    """Run an experiment's quick mode; check its picture and that each row starts a table line. -> (page, cells)"""
    r = experiments(name, "--quick", *args, f"--out={tmp_path}", f"--data_dir={data_dir}", timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    page = (tmp_path / f"{name}.md").read_text()
    assert ET.parse(tmp_path / f"{name}.svg").getroot().tag.endswith("svg")
    cells = [line for line in page.splitlines() if line.startswith("| ")]
    for row in rows:
        assert any(line.startswith(f"| {row}") for line in cells), (row, cells)
    return page, cells


@pytest.mark.parametrize("name, rows", [
    ("ladder", ["GPT-2 style (learned, LayerNorm, GELU, MHA)", "+ RoPE", "+ ... + GQA 4:2 |",
                "+ ... + GQA 4:2 + PyTorch's init, untied head (this repository's default)"]),
    ("ladder_alone", ["GPT-2 style (learned, LayerNorm, GELU, MHA)", "+ SwiGLU only", "+ MQA 4:1 only"]),
    ("positions", ["learned (GPT-2)", "RoPE", "RoPE + position interpolation (PI)", "RoPE + NTK-aware scaling",
                   "RoPE + YaRN (NTK-by-parts, temperature)", "ALiBi", "RoPE + PI, fine-tuned at 2T | - |",
                   "RoPE + YaRN, fine-tuned at 2T | - |"]),
    ("norms", ["2 | 3e-3 | pre | 100 steps", "2 | 3e-3 | post | none", "LayerNorm", "RMSNorm", "64 x 128", "256 x 512"]),
    ("attention", ["MHA 4:4", "GQA 4:2", "MQA 4:1", "8:8 (MHA)", "8:2 (GQA)", "8:1 (MQA)", "T | 4 | 256", "D | 4 | 256 | 64",
                   "H | 1 |"]),
])
def test_experiment_quick_page(name, rows, tmp_path, data_dir):
    page, cells = quick_page(name, rows, tmp_path, data_dir)
    assert "FAILED" not in page and f"python -m lab.experiments {name} --quick" in page
    assert all("nan" not in line for line in cells), cells


def test_runner_reuses_a_finished_run_and_replaces_a_failed_one(tmp_path, data_dir):
    from lab.runner import train_once
    run_dir = tmp_path / "run"
    args = ["--n_layer=1", "--d_model=32", "--n_head=2", "--n_kv_head=1", "--block_size=32", "--batch_size=4",
            "--max_iters=2", "--eval_interval=1", "--eval_iters=1", "--device=cpu", f"--data_dir={data_dir}",
            f"--out_dir={run_dir}"]
    first = train_once(args, run_dir)
    assert first.ok and not first.reused
    ckpt = (run_dir / "ckpt_last.pt").read_bytes()
    assert train_once(args, run_dir).reused and (run_dir / "ckpt_last.pt").read_bytes() == ckpt
    (run_dir / "args.json").write_text((run_dir / "args.json").read_text().replace('"rc": 0', '"rc": 1'))
    again = train_once(args, run_dir)  # as after a failure: train.py must be told to replace the run
    assert again.ok and not again.reused, (run_dir / "log.txt").read_text()
    assert train_once(args, run_dir).reused
    stamp = json.loads((run_dir / "args.json").read_text())  # the same arguments, trained by other code: redone
    (run_dir / "args.json").write_text(json.dumps({**stamp, "code": "0" * 16}))
    assert not train_once(args, run_dir).reused


def test_code_hash_follows_the_model_file_a_run_builds(monkeypatch, tmp_path):
    from lab import runner
    real = Path.read_bytes
    changed = lambda name: lambda self: real(self) + (b"#" if self.name == name else b"")
    base = {m: runner.code_hash([f"--model={m}"]) for m in ("transformer", "mamba")}
    assert base["transformer"] == runner.code_hash([]) != base["mamba"]  # the default model is the Transformer
    monkeypatch.setattr(Path, "read_bytes", changed("model_mamba.py"))
    assert runner.code_hash(["--model=mamba"]) != base["mamba"] and runner.code_hash([]) == base["transformer"]
    monkeypatch.setattr(Path, "read_bytes", changed("kernels.py"))
    assert runner.code_hash([]) != base["transformer"]


# ----------------------------------------------------------------------------- bench and gpu_check.sh
# the scan benchmark's baseline, the attention table's failure handling, gpu_check.sh's preflight

def test_bench_blelloch_baseline_matches_reference():  # the baseline of the speed target must be right too
    for L in (1, 6, 16):
        args = bench_scan.scan_args(2, 5, 3, L, "cpu", torch.float32)
        want = kernels.selective_scan_ref(**args)
        torch.testing.assert_close(bench_scan.selective_scan_blelloch(**args), want, atol=1e-5, rtol=1e-4)
        g = torch.randn_like(want)
        for a, b in zip(torch.autograd.grad(bench_scan.selective_scan_blelloch(**args), list(args.values()), g),
                        torch.autograd.grad(want, list(args.values()), g)):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@needs_triton
def test_bench_byte_counter_counts_what_operations_touch():
    """The traffic the mamba section sets against the bandwidth: arguments and outputs over the memory
    they span, views free, a broadcast operand once, an out= buffer twice (read for ownership, written)."""
    from lab.bench_mamba import ByteCounter
    a, b, row, out = torch.rand(100, 10), torch.rand(100, 10), torch.rand(10), torch.empty(100, 10)
    for fn, want in [(lambda: a * b, 3 * 4000), (lambda: a.t()[2:5], 0), (lambda: a * row.expand(100, 10), 2 * 4000 + 40),
                     (lambda: torch.mul(a, b, out=out), 4 * 4000), (lambda: a[:50].sum(0), 2000 + 40)]:
        with ByteCounter() as c:
            fn()
        assert c.bytes == want, (c.bytes, want)


def test_bench_attention_table_survives_a_failing_implementation(monkeypatch, capsys):
    from triton.runtime.errors import OutOfResources
    monkeypatch.setattr(bench_attention, "gpu_time_ms", lambda fn: (fn(), 1.0)[1])  # no CUDA here: one call, a made-up 1 ms
    monkeypatch.setattr(bench_attention, "cuda_peak_mib", lambda fn: (fn(), 0.0)[1])

    def broken(q, k, v, causal):
        raise OutOfResources(262144, 232448, "shared memory")
    impls = {"triton": lambda q, k, v, causal: kernels.attention(q, k, v, causal=causal, impl="triton"),
             "broken": broken,
             "explicit": lambda q, k, v, causal: kernels.attention_ref(q, k, v, causal=causal)}
    bench_attention.attention_gpu(shapes=((1, 2, 40, 16, True),), device=TRITON_DEVICE, impls=impls)
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in capsys.readouterr().out.splitlines()
             if line.startswith("| B1 H2 T40 D16")]
    rows = {r[2]: r for r in cells}  # shape, mask, impl, fwd, bwd, fwd+bwd, fwd+bwd / matmul, peak MiB, note
    assert rows.keys() == {"triton", "broken", "explicit"}
    assert rows["broken"][8].startswith("failed: OutOfResources: out of resource: shared memory, Required: 262144")
    for ok in ("triton", "explicit"):  # TFLOP/s from the made-up 1 ms, and no failure note
        assert rows[ok][8] == "" and rows[ok][3].isdigit()


def test_triton_gpu_check_preflight_stops_with_a_clear_message(tmp_path):
    fake = tmp_path / "fake" / "triton"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('no Triton built for this machine')\n")
    other = tmp_path / "bin" / "python3"  # a python3 on PATH that is not this interpreter: the script must use PYTHON
    other.parent.mkdir()
    other.write_text("#!/bin/sh\necho 'the python3 on PATH ran, not PYTHON' >&2\nexit 1\n")
    other.chmod(0o755)
    env = {**ENV, "OUT": str(tmp_path / "out"), "PYTHONPATH": str(fake.parent), "PYTHON": sys.executable,
           "PATH": f"{other.parent}:{os.environ['PATH']}"}
    t = time.time()
    r = subprocess.run(["bash", str(REPO / "lab" / "gpu_check.sh")], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 3 and "preflight FAILED" in r.stdout and "no Triton built for this machine" in r.stdout
    assert "preflight FAILED" in (tmp_path / "out" / "gpu_check.txt").read_text()
    assert time.time() - t < 60 and "== tests" not in r.stdout
    if not torch.cuda.is_available():  # (on a GPU machine this would start the real run)
        env["PYTHONPATH"] = ""
        r = subprocess.run(["bash", str(REPO / "lab" / "gpu_check.sh")], env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 3 and "preflight FAILED: torch sees no CUDA device" in r.stdout


# ----------------------------------------------------------------------------- the claim experiments
# the verdict rule, the maps the inspection draws, and each experiment's quick page

def test_verdicts_follow_the_noise_rule():
    from lab.verdicts import fmt, verdict, within_noise
    a, b = [1.0, 1.1, 0.9], [2.0, 2.1, 1.9]  # sd 0.1 each: the difference 1.0 is ~12 standard errors
    assert within_noise(a, b) is False and verdict(b, a, ">") == "confirmed" and verdict(b, a, "<") == "disagrees"
    assert within_noise(a, [1.05, 1.15, 0.95]) and verdict(a, [1.05, 1.15, 0.95], ">") == "no measurable difference"
    assert verdict([1.0], [2.0], ">") == "not measured" and within_noise([1.0], a) is None  # one seed: no spread
    assert verdict([0.0, 0.0], [0.0, 0.0], ">") == "no measurable difference"  # equal, no spread
    assert verdict([1.0, 1.0], [0.0, 0.0], ">") == "confirmed"  # different, no spread
    assert fmt(a) == "1.000 ± 0.100 (n=3)" and fmt([0.5]) == "0.500 (n=1)" and fmt([float("nan")]) == "n/a"


def test_unexplained_disagreements_are_named_without_their_setting():
    from lab.verdicts import claim, unexplained
    low, high = [1.0, 1.1, 1.2], [2.0, 2.1, 2.2]
    lines = [claim("Setting, 4 layers: A beats B", "a", low, "b", high, ">"), claim("Setting: C beats D", "c", high, "d", low, ">"),
             claim("Setting: E beats F", "e", low, "f", high, ">")]
    assert unexplained(lines) == 'Where a claim above reads disagrees ("A beats B"; "E beats F"), why is untested on this page.'
    assert unexplained(lines, ["A beats", "E beats"]) == ""


def test_readme_verdict_table_is_the_pages_claim_lines(tmp_path):
    from lab.verdicts import BEGIN, END, claim, page_claims, with_table
    readme = (REPO / "README.md").read_text()
    assert readme == with_table(readme, REPO / "results"), "README's verdict table differs: python -m lab.verdicts"
    page = tmp_path / "x.md"  # a claim line as the pages write it is read back whole
    page.write_text("text\n" + claim("Setting: A beats B (on a | table)", "A", [2.0, 2.1, 1.9], "B", [1.0, 1.1, 0.9], ">") + "\n")
    [(name, text, measured, word)] = page_claims(tmp_path)
    assert (name, text, word) == ("x.md", "Setting: A beats B (on a | table)", "confirmed")
    assert measured == "A 2.000 ± 0.100 (n=3) against B 1.000 ± 0.100 (n=3)"
    table = with_table(f"a\n{BEGIN}\nold\n{END}\nb", tmp_path)
    assert "| Setting: A beats B (on a / table) |" in table and "confirmed | [x.md](results/x.md) |" in table and "old" not in table


@pytest.mark.parametrize("variant", [dict(pos="rope", n_kv_head=2, attn_scale="one"), dict(pos="alibi", n_kv_head=1)])
def test_inspected_attention_maps_are_the_models_own(variant, monkeypatch):
    """The maps the lab recomputes are the probabilities the explicit path computes inside the model."""
    import model_transformer
    from lab.inspection import attention_maps
    torch.manual_seed(0)
    m = model_transformer.Model(model_transformer.Config(vocab_size=31, block_size=24, d_model=32, n_layer=2, n_head=4,
                                                         flash=False, **variant)).eval()
    idx = torch.randint(0, 31, (2, 24))
    maps = attention_maps(m, idx)
    seen, softmax = [], torch.softmax
    monkeypatch.setattr(torch, "softmax", lambda x, dim: seen.append(softmax(x, dim=dim)) or seen[-1])
    m(idx)
    assert len(maps) == len(seen) == 2
    for got, want in zip(maps, seen):
        torch.testing.assert_close(got, want)


def test_mamba_implicit_attention_reproduces_the_scan_and_is_toeplitz_when_time_invariant():
    """y = alpha x (Ali et al.) equals the scan; without selectivity alpha[t, s] depends on t - s only."""
    import model_mamba
    from lab.inspection import implicit_attention, mamba_attention
    g = torch.Generator().manual_seed(0)
    Bsz, I, N, T = 2, 5, 3, 11
    u, dt, Bm, Cm = torch.randn(Bsz, I, T, generator=g), torch.randn(Bsz, I, T, generator=g), \
        torch.randn(Bsz, N, T, generator=g), torch.randn(Bsz, N, T, generator=g)
    A = -torch.rand(I, N, generator=g) * 2 - 0.1
    alpha = implicit_attention(torch.nn.functional.softplus(dt), A, Bm, Cm)  # (B, I, T, T)
    torch.testing.assert_close(torch.einsum("bits,bis->bit", alpha, u), kernels.selective_scan_ref(u, dt, A, Bm, Cm),
                               atol=1e-5, rtol=1e-4)
    for selective, toeplitz in (("none", True), ("all", False)):
        torch.manual_seed(0)
        m = model_mamba.Model(model_mamba.Config(vocab_size=31, d_model=16, n_layer=1, d_state=4, selective=selective))
        a = mamba_attention(m, torch.randint(0, 31, (1, 12)))[0][0]  # (I, T, T)
        diagonals_equal = all(torch.allclose(a.diagonal(-k, 1, 2), a.diagonal(-k, 1, 2)[:, :1].expand(-1, 12 - k), atol=1e-6)
                              for k in range(12))
        assert diagonals_equal == toeplitz, selective
        assert torch.equal(a.triu(1), torch.zeros_like(a))  # causal


@pytest.mark.parametrize("name, rows, claims", [
    ("selectivity", ["dt, B, C selective (Mamba, S6)", "dt only", "B, C only", "none (LTI, S4D)", "no-recall baseline"], 2),
    ("balance", ["softmax + balance loss (Switch)", "softmax, no balance loss", "sigmoid + bias, no loss (DeepSeek-V3)",
                 "softmax + loss, capacity factor 1.25"], 5),
    ("attn_scale", ["64 | 2 | 1/sqrt(D)", "128 | 1 | 1 |", "128 | 1 | 1/D"], 4),
    ("context_cost", ["Transformer, tiled attention", "Transformer, explicit attention", "Mamba", "hybrid Md Ad"], 2),
    ("inspect", ["transformer | layer 1 head 3", "mamba | layer 0, implicit"], 0),
])
def test_claim_experiment_quick_page(name, rows, claims, tmp_path, data_dir):
    page, cells = quick_page(name, rows, tmp_path, data_dir, "--seeds=1")
    verdicts = [line for line in page.splitlines() if line.startswith("- ") and "-> **" in line]
    words = [v.rsplit("-> **", 1)[1].rstrip("*") for v in verdicts]
    assert len(words) == claims and set(words) <= set(VERDICTS)
    assert name == "context_cost" or set(words) <= {"not measured"}  # one seed: no spread (context_cost: over rounds)
    assert "FAILED" not in page and f"python -m lab.experiments {name} --quick" in page
    assert all("nan" not in line for line in cells), cells


def test_kaplan_counting_leaves_out_the_vocabulary_matrices():
    n, n_k = scaling.params_of("transformer", dict(d_model=32, n_layer=2, n_head=4), 65, 64)[0], \
        scaling.non_embedding_params(32, 2, 65, 64)
    assert n - n_k == 2 * 65 * 32  # the embedding and the untied head; RoPE has no position matrix
    optima = [(1e9, 40_000.0, 8e5, 1.5), (3e9, 60_000.0, 1.6e6, 1.4)]  # (C, N, D, loss), N between the grid's sizes
    sizes = [(16, 2), (32, 2), (64, 2)]
    info = {s: scaling.params_of("transformer", dict(d_model=s[0], n_layer=s[1], n_head=4), 65, 64) for s in sizes}
    exponent, points = scaling.kaplan_refit(optima, sizes, info, 65, 64)
    for (c, n), (_, n_full, d, _) in zip(points, optima):
        assert n < n_full and c == 6 * n * d  # fewer parameters counted; C = 6 N D
    assert abs(exponent - math.log(points[1][1] / points[0][1]) / math.log(points[1][0] / points[0][0])) < 1e-9
