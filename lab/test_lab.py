import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton kernels run on the CPU in tests; set before kernels import

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


def test_experiment_recall_quick(tmp_path):
    page, rows = quick_experiment("recall", tmp_path)
    table = {r[0]: r for r in rows}
    assert {"transformer", "hybrid Md Ad", "no-recall baseline"} <= table.keys()
    assert 0 < float(table["no-recall baseline"][3]) < 0.2  # induction: 1 / (16 - 4)
    assert all(0 <= float(table[m][4].split()[0]) <= 1 for m in ("transformer", "hybrid Md Ad"))  # @4x
    assert (tmp_path / "recall.svg").read_text().count("<rect") >= 4  # background + three bars


def test_experiment_mqar_quick(tmp_path):
    page, rows = quick_experiment("mqar", tmp_path)
    base = next(r for r in rows if r[0] == "no-recall baseline")  # 2 and 4 pairs
    assert float(base[3]) > float(base[4]) > 0.2  # fewer values: the bag rule does better
    svg = (tmp_path / "mqar.svg").read_text()
    assert svg.count("<polyline") == 3 and "key-value pairs" in svg
    assert (tmp_path / "runs" / "recall").is_dir()  # recall and mqar share one run folder


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
    budget_rows = [r for r in rows if r[0] in ("2e+08", "6e+08") and len(r) == 5]
    optima = [r for r in budget_rows if r[1] == "parabola" or r[1].startswith("best point")]
    assert len(budget_rows) == 6 + 2 and len(optima) == 2  # 2 budgets x 3 sizes, then one optimum per budget
    assert all(float(r[2].replace(",", "")) > 0 for r in optima)
    assert "Fit: N_opt ∝ C^" in page and "20 tokens per parameter" in page


def test_experiment_architectures_quick(tmp_path):
    page, rows = quick_experiment("architectures", tmp_path)
    for m in ("transformer", "moe", "mamba", "hybrid"):
        cost, learned = [r for r in rows if r[0] == m]
        assert cost[7].endswith("MiB") and float(cost[6].replace(",", "")) > 0  # decode speed and cache
        assert len(learned) == 3 and 0 <= float(learned[2].split()[0]) <= 1  # mqar loss, acc (baseline)
        assert 0 < float(learned[2].split("(")[1].rstrip(")")) < 1
    assert "decode tok/s @256" in page
    assert (tmp_path / "architectures.svg").read_text().count("<polyline") == 4


@pytest.mark.parametrize("name, rows", [
    ("ladder", ["GPT-2 style (learned, LayerNorm, GELU, MHA)", "+ RoPE", "+ ... + GQA 4:2 |",
                "+ ... + GQA 4:2 + PyTorch's init, untied head (this repository's default)"]),
    ("ladder_alone", ["GPT-2 style (learned, LayerNorm, GELU, MHA)", "+ SwiGLU only", "+ MQA 4:1 only"]),
    ("positions", ["learned (GPT-2)", "RoPE", "RoPE + position interpolation (PI)", "RoPE + NTK-aware scaling", "ALiBi"]),
    ("norms", ["2 | 3e-3 | pre | 100 steps", "2 | 3e-3 | post | none", "LayerNorm", "RMSNorm", "64 x 128", "256 x 512"]),
    ("attention", ["MHA 4:4", "GQA 4:2", "MQA 4:1", "8:8 (MHA)", "8:2 (GQA)", "T | 4 | 256", "D | 4 | 256 | 64", "H | 1 |"]),
])
def test_experiment_quick_page(name, rows, tmp_path, data_dir):
    r = experiments(name, "--quick", f"--out={tmp_path}", f"--data_dir={data_dir}", timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    page = (tmp_path / f"{name}.md").read_text()
    assert ET.parse(tmp_path / f"{name}.svg").getroot().tag.endswith("svg")
    cells = [line for line in page.splitlines() if line.startswith("| ")]
    for row in rows:
        assert any(line.startswith(f"| {row}") for line in cells), (row, cells)
    assert "FAILED" not in page and f"python -m lab.experiments {name} --quick" in page
    assert all("nan" not in line for line in cells), cells


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
    rows = {r[2]: r for r in cells}  # shape, mask, impl, fwd, bwd, fwd+bwd, peak MiB, note
    assert rows.keys() == {"triton", "broken", "explicit"}
    assert rows["broken"][7].startswith("failed: OutOfResources: out of resource: shared memory, Required: 262144")
    for ok in ("triton", "explicit"):  # TFLOP/s from the made-up 1 ms, and no failure note
        assert rows[ok][7] == "" and rows[ok][3].isdigit()


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
