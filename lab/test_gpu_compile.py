"""The kernels compiled for Hopper on the CPU: what the interpreter cannot see (operand types a GPU
dot rejects, register spills, shared memory, grid limits) fails here."""
import ast
import os
import re
import subprocess
import sys
import time

import importlib.util

import pytest

from lab import gpu_compile, gpu_compile_page

# Triton is only looked for here, not imported: imported before TRITON_INTERPRET=1 is set (by the
# kernel tests that follow), its own @jit helpers would not run in the interpreter.
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="no Triton on this platform")

KERNELS = {"_flash_fwd_kernel", "_flash_bwd_pre_kernel", "_flash_bwd_dkdv_kernel", "_flash_bwd_dq_kernel",
           "_scan_fwd_kernel", "_scan_bwd_kernel"}


@needs_triton
def test_kernels_compile_for_sm90_without_spills():
    out = gpu_compile.in_subprocess(sys.executable, ["--arch=90"], timeout=300)
    records = out["records"]
    assert {r["kernel"] for r in records} == KERNELS, [r.get("error") for r in records]
    assert {r["case"] for r in records} == {name for name, _, _ in gpu_compile.handful()}
    bad = {f"{r['kernel']} ({r['case']})": gpu_compile.problems(r) for r in records if gpu_compile.problems(r)}
    assert not bad, bad
    assert all(r["regs"] > 0 for r in records)
    scan_fwd = [r for r in records if r["kernel"] == "_scan_fwd_kernel"]
    assert len(scan_fwd) == 2  # with checkpoints (training) and without (the no-grad forward)
    run = dict(python=sys.executable, python_version=out["python"], torch=out["torch"], triton=out["triton"],
               records=records, sweep=records, wall_s=out["wall_s"])
    page = gpu_compile_page.page([run], "python -m lab.bench gpu_compile")  # the page's code on real records
    assert f"Triton {out['triton']}" in page and "sm_90" in page and "predicted" in page.lower()


def test_the_check_names_each_problem():
    ok = dict(kernel="k", case="c", arch=90, grid=(8, 4), regs=128, spills=0, shared=1024)
    assert gpu_compile.problems(ok) == []
    assert "spills" in gpu_compile.problems({**ok, "spills": 8})[0]
    assert "shared memory" in gpu_compile.problems({**ok, "shared": 228 * 1024})[0]
    assert gpu_compile.problems({**ok, "shared": 200 * 1024}) == []  # fits Hopper ...
    assert "shared memory" in gpu_compile.problems({**ok, "arch": 80, "shared": 200 * 1024})[0]  # ... not Ampere
    assert "grid axis 1" in gpu_compile.problems({**ok, "grid": (1, 65536)})[0]
    assert "compile error: CompilationError" in gpu_compile.problems({**ok, "error": "CompilationError: at 3:4\n..."})[0]


def test_occupancy_from_registers():
    assert gpu_compile.occupancy(255, 8, 1024, 90) == (1, 8 / 64)  # 8 warps at the register cap: one block
    assert gpu_compile.occupancy(128, 4, 1024, 90) == (4, 16 / 64)
    assert gpu_compile.occupancy(32, 4, 100 * 1024, 90) == (2, 8 / 64)  # shared memory limits it


@needs_triton
def test_grids_fit_cuda_limits_at_70000_heads():
    """B * H past 65535 (decoding a large batch): no grid axis may exceed CUDA's limits."""
    out = gpu_compile.in_subprocess(sys.executable, ["--cases=wide", "--launches-only"], timeout=120)
    records = out["records"]
    assert {r["kernel"] for r in records} == KERNELS - {"_scan_fwd_kernel", "_scan_bwd_kernel"}
    assert all(not gpu_compile.problems(r) for r in records), [gpu_compile.problems(r) for r in records]


@needs_triton
def test_kernel_config_reaches_every_launch():
    spec = "fwd=64,32,4,2 dkdv=32,64,2,1 dq=32,16,8,3 scan=16,32,8"
    out = gpu_compile.in_subprocess(sys.executable, ["--launches-only"], timeout=120, env={"KERNEL_CONFIG": spec})
    seen = {}
    for r in out["records"]:
        c = r["constexprs"]
        if r["kernel"].startswith("_scan"):
            seen[r["kernel"]] = (c["BLOCK_D"], c["CKPT"], r["warps"])
        elif r["kernel"] != "_flash_bwd_pre_kernel":
            seen[r["kernel"]] = (c["BLOCK_M"], c["BLOCK_N"], r["warps"], r["stages"])
    assert seen == {"_flash_fwd_kernel": (64, 32, 4, 2), "_flash_bwd_dkdv_kernel": (32, 64, 2, 1),
                    "_flash_bwd_dq_kernel": (32, 16, 8, 3), "_scan_fwd_kernel": (16, 32, 8), "_scan_bwd_kernel": (16, 32, 8)}


@needs_triton
def test_a_malformed_kernel_config_is_named():
    out = gpu_compile.in_subprocess(sys.executable, ["--launches-only"], timeout=120, env={"KERNEL_CONFIG": "fwd=48,64,4,2"})
    assert out["records"] and all("KERNEL_CONFIG entry 'fwd=48,64,4,2'" in r["error"] for r in out["records"])


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_check_runs_the_kernel_tests_and_only_them():
    """Its test stage names tests by node id: exactly the Triton kernel tests of test_models.py
    (decorated needs_triton or needs_gpu, 'triton' in the name), so a renamed or new kernel test
    cannot drop out silently, and nothing that starts train.py rides along."""
    with open(os.path.join(ROOT, "lab", "gpu_check.sh")) as f:
        listed = set(re.search(r"KERNEL_TESTS=\((.*?)\)", f.read(), re.S).group(1).split())
    with open(os.path.join(ROOT, "test_models.py")) as f:
        tree = ast.parse(f.read())
    kernel_tests = {node.name for node in tree.body if isinstance(node, ast.FunctionDef) and "triton" in node.name
                    and {ast.unparse(d) for d in node.decorator_list} & {"needs_triton", "needs_gpu"}}
    assert listed == kernel_tests


def test_gpu_check_ends_within_its_total_time(tmp_path):
    """A stand-in python that sees a GPU and then hangs in every stage, deaf to SIGINT: each stage
    is cut at its budget plus its kill grace, the stages with no time left are skipped, and the
    whole run ends within TOTAL_S."""
    fake = tmp_path / "python"
    fake.write_text('#!/usr/bin/env bash\n'
                    'if [ "$1" = - ]; then cat > /dev/null; echo "GPU Stand-in (sm_90, 141 GiB)"; exit 0; fi\n'
                    'if [ "$1" = -c ]; then exit 1; fi\n'  # no pytest-xdist
                    'trap "" INT\nsleep 1000\n')
    fake.chmod(0o755)
    env = {**os.environ, "PYTHON": str(fake), "TOTAL_S": "40", "OUT": str(tmp_path / "out")}
    t0 = time.monotonic()
    p = subprocess.run(["bash", os.path.join(ROOT, "lab", "gpu_check.sh")], env=env, capture_output=True, text=True,
                       timeout=120)
    took = time.monotonic() - t0
    assert took <= 40, p.stdout
    assert "smoke (" in p.stdout and "OUT OF TIME" in p.stdout
    assert p.stdout.count("SKIPPED") == 4  # the tests and three benchmarks
    assert p.returncode == 1
