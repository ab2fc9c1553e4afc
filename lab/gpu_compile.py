"""
The Triton kernels compiled for a GPU, on a machine without one.

Triton compiles ahead of time: its compiler and NVIDIA's assembler (ptxas, shipped inside the
triton wheel) need no GPU. Here the public entry points, kernels.attention and
kernels.selective_scan, run on CPU tensors while every kernel launch is caught and compiled for a
target GPU instead of run. The arguments go through Triton's own argument binder, so each variant
is specialised exactly as a launch on that GPU would specialise it (constexprs, dtypes, integers
equal to 1 or divisible by 16, aligned pointers, warps, stages). Each cubin's registers, local
memory (spills) and shared memory are read with cuobjdump, also from the wheel. Nothing runs, so
the tensors the entry points return are garbage: only the launches matter.

    python -m lab.gpu_compile                       # the handful the test compiles, sm_90, one table
    python -m lab.gpu_compile --cases=all --arch=90,80   # every variant results/gpu_compile.md lists
    python -m lab.gpu_compile --cases=sweep         # the launch settings the GPU sweep tries
    python -m lab.gpu_compile --cases=wide --launches-only   # grids at B*H = 70000, nothing compiled
    python -m lab.bench gpu_compile                 # results/gpu_compile.md (lab/gpu_compile_page.py)

--json=FILE writes the records as JSON instead of a table. Exit 1 when a variant fails to
compile, spills, needs more shared memory than the target has, or has a grid past CUDA's limits.
"""
import contextlib
import json
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import time

import torch

# What one thread block may use, from NVIDIA's CUDA C++ Programming Guide (compute capabilities):
# shared memory per block with the opt-in maximum, and the per-SM pools that set occupancy.
SM = {
    80: dict(name="A100 (sm_80)", shared_per_block=163 * 1024, shared_per_sm=164 * 1024),
    90: dict(name="H100/H200 (sm_90)", shared_per_block=227 * 1024, shared_per_sm=228 * 1024),
}
REGS_PER_SM, MAX_WARPS_PER_SM, MAX_BLOCKS_PER_SM, REG_CAP = 65536, 64, 32, 255
GRID_LIMITS = (2**31 - 1, 65535, 65535)  # blocks per launch along grid axes 0, 1, 2

# The H200's limits the predictions use: dense bf16 tensor-core FLOP/s and HBM3e bandwidth
# (NVIDIA's H200 datasheet), 132 SMs, a 50 MB L2, and exp2 at 16 per clock per SM (the CUDA
# guide's throughput table for compute capability 9.0) at the 1.98 GHz boost clock.
H200 = dict(matmul_flops=989e12, hbm_bytes=4.8e12, sms=132, l2_bytes=50e6, exp2_per_s=16 * 132 * 1.98e9)

# Every variant a GPU run can launch: attention forward and backward (causal, the models' mask;
# MHA, so the head group is the constant 1) and the scan forward, backward and no-grad forward.
ATTENTION_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
ATTENTION_HEAD_DIMS = (64, 80, 128)
SCAN_DTYPES = (torch.bfloat16, torch.float32)
SCAN_STATE_SIZES = (16, 64)

# The launch settings a GPU sweep tries, as KERNEL_CONFIG entries (kernels._config): the default
# first. Attention at bf16 D=128 (BLOCK_M,BLOCK_N,warps,stages), the scan at bf16
# (block_d,ckpt,warps): smaller tiles and fewer stages free registers; a shorter ckpt shrinks the
# backward's scratch buffer and writes more checkpoints.
SWEEP = {
    "fwd": ["128,64,8,3", "128,64,8,2", "128,32,8,3", "128,128,8,2", "64,64,4,3", "64,64,4,4", "64,32,4,3", "128,64,4,3"],
    "dkdv": ["64,64,8,2", "64,64,4,2", "32,64,4,2", "64,32,4,2", "32,128,8,2", "64,128,8,2", "64,64,8,1", "32,32,4,2"],
    "dq": ["64,64,8,2", "64,64,4,2", "128,64,8,2", "128,32,8,2", "64,32,4,2", "32,64,4,2", "64,64,8,1", "128,64,4,2"],
    "scan": ["32,64,4", "16,64,4", "8,64,4", "64,64,4", "32,64,8", "32,32,4", "32,16,4", "16,16,4"],
}
SWEEP_KERNELS = {"fwd": ["_flash_fwd_kernel"], "dkdv": ["_flash_bwd_dkdv_kernel"], "dq": ["_flash_bwd_dq_kernel"],
                 "scan": ["_scan_fwd_kernel", "_scan_bwd_kernel"]}


def short(dtype):
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]


@contextlib.contextmanager
def kernel_config(spec):
    """KERNEL_CONFIG=spec inside (kernels reads it at every launch)."""
    old = os.environ.get("KERNEL_CONFIG")
    os.environ["KERNEL_CONFIG"] = spec
    try:
        yield
    finally:
        if old is None:
            del os.environ["KERNEL_CONFIG"]
        else:
            os.environ["KERNEL_CONFIG"] = old


def attention_case(dtype, D, alibi, B=2, H=4, T=256):
    """Forward then backward of causal attention with q, k, v (B, H, T, D) in dtype."""
    q, k, v = (torch.randn(B, H, T, D).to(dtype).requires_grad_() for _ in range(3))
    slopes = 2.0 ** (-8.0 * torch.arange(1, H + 1) / H) if alibi else None  # the ALiBi paper's slopes
    o = kernels().attention(q, k, v, causal=True, alibi_slopes=slopes, impl="triton")
    o.backward(torch.randn_like(o))


def scan_case(dtype, N, B=2, Dm=64, L=256, no_grad=True):
    """The scan as the Mamba layer calls it: forward and backward for training, then the no-grad
    forward from a state, as generation's prefill calls it."""
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    u, delta, z = (r(B, Dm, L).to(dtype) for _ in range(3))
    Bm, Cm = r(B, N, L).to(dtype), r(B, N, L).to(dtype)
    A, D, bias = -torch.rand(Dm, N, generator=g), r(Dm), r(Dm)
    args = [x.requires_grad_() for x in (u, delta, A, Bm, Cm, D, z)]
    out = kernels().selective_scan(*args, delta_bias=bias, delta_softplus=True, impl="triton")
    out.backward(torch.randn_like(out))
    if no_grad:
        with torch.no_grad():
            kernels().selective_scan(u, delta, A, Bm, Cm, D, z, delta_bias=bias, delta_softplus=True,
                                     initial_state=torch.zeros(B, Dm, N), return_last_state=True, impl="triton")


def handful():
    """What the test compiles: bf16 attention at D=64 and 128, the scan at Mamba's N=16."""
    return [(f"attention bf16 D={D}", None, lambda D=D: attention_case(torch.bfloat16, D, False)) for D in (64, 128)] + \
           [("scan bf16 N=16", None, lambda: scan_case(torch.bfloat16, 16))]


def every_variant():
    cases = []
    for dtype in ATTENTION_DTYPES:
        for D in ATTENTION_HEAD_DIMS:
            for alibi in (False, True):
                name = f"attention {short(dtype)} D={D}{' ALiBi' if alibi else ''}"
                cases.append((name, None, lambda dtype=dtype, D=D, alibi=alibi: attention_case(dtype, D, alibi)))
    for dtype in SCAN_DTYPES:
        for N in SCAN_STATE_SIZES:
            cases.append((f"scan {short(dtype)} N={N}", None, lambda dtype=dtype, N=N: scan_case(dtype, N)))
    return cases


def sweep_variants():
    """Each SWEEP setting of each kernel, through KERNEL_CONFIG, recording only that kernel."""
    cases = []
    for name, settings in SWEEP.items():
        for setting in settings:
            spec = f"{name}={setting}"
            if name == "scan":
                for N in SCAN_STATE_SIZES:
                    cases.append((f"scan bf16 N={N} {spec}", SWEEP_KERNELS[name],
                                  lambda spec=spec, N=N: _with(spec, lambda: scan_case(torch.bfloat16, N, no_grad=False))))
            else:
                cases.append((f"attention bf16 D=128 {spec}", SWEEP_KERNELS[name],
                              lambda spec=spec: _with(spec, lambda: attention_case(torch.bfloat16, 128, False))))
    return cases


def _with(spec, fn):
    with kernel_config(spec):
        fn()


def wide():
    """Decoding one token for 70000 (sequence, head) pairs: B * H past CUDA's 65535 blocks per
    grid axis 1 and 2."""
    return [(f"attention bf16 D=64 B*H=70000 T=1", None,
             lambda: attention_case(torch.bfloat16, 64, False, B=4375, H=16, T=1))]


CASES = {"handful": handful, "all": every_variant, "sweep": sweep_variants, "wide": wide}


def kernels():
    import kernels as k
    if k.INTERPRET:  # its kernels are interpreter objects, with nothing to compile
        raise RuntimeError("kernels was imported with TRITON_INTERPRET=1: run the compile check in a fresh "
                           "process (python -m lab.gpu_compile)")
    return k


def cuobjdump():
    import triton
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return path if os.path.exists(path) else "cuobjdump"


def resources(compiled):
    """Registers per thread, local memory per thread (spills) and shared memory per block of a
    compiled kernel: registers and local memory from its cubin, shared memory = the dynamic
    allocation Triton planned plus any static shared memory in the cubin."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        text = subprocess.run([cuobjdump(), "-res-usage", path], capture_output=True, text=True, check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", text)
    regs, stack, static_shared, local = map(int, m.groups())
    return dict(regs=regs, spills=local + stack, shared=compiled.metadata.shared + static_shared)


def error_text(e):
    """An exception and its causes, innermost last: Triton reports an error inside a called
    @jit function at the call site, with the real reason in __cause__."""
    parts = []
    while e is not None:
        parts.append(f"{type(e).__name__}: {e}".strip())
        e = e.__cause__
    return "\n".join(parts)


class Recorder:
    """One record per distinct variant launched; `case` names what is being driven, `only`
    (kernel names or None) limits what is recorded."""

    def __init__(self):
        self.records, self.keys, self.case, self.only = [], set(), "", None


@contextlib.contextmanager
def compiled_for(arch, recorder, compile=True):
    """Inside, every launch of a kernels.py kernel is compiled for sm_<arch> (or, compile=False,
    only its grid and launch settings recorded) instead of run."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    fns = [f for f in vars(kernels()).values() if isinstance(f, JITFunction)]

    def launcher(fn):
        binder = create_function_from_signature(fn.signature, fn.params, backend)

        def run(*args, grid, warmup, **kwargs):
            if recorder.only is not None and fn.__name__ not in recorder.only:
                return None
            bound, specialization, options = binder(*args, **kwargs)
            opts, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
            launch = {k: v for k, v in kwargs.items() if k not in fn.arg_names}
            grid = tuple(grid(bound) if callable(grid) else grid)
            key = (fn.__name__, repr(signature), repr(constexprs), repr(attrs), repr(sorted(launch.items())))
            if key in recorder.keys:  # compiled already (another case launches the same variant)
                return None
            recorder.keys.add(key)
            rec = dict(kernel=fn.__name__, case=recorder.case, arch=arch, warps=opts.num_warps, stages=opts.num_stages,
                       grid=grid, constexprs={fn.arg_names[k[0]]: v for k, v in constexprs.items()
                                              if isinstance(v, (bool, int, float, str))})
            if compile:
                t0 = time.perf_counter()
                try:
                    compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=launch)
                except Exception as e:  # a compile error is a finding: record it, with the compiler's words
                    rec["error"] = error_text(e)
                    recorder.records.append(rec)
                    raise
                rec["compile_s"] = time.perf_counter() - t0
                rec.update(resources(compiled))
            recorder.records.append(rec)
            return None
        return run

    for fn in fns:
        fn.run = launcher(fn)  # an instance attribute: `kernel[grid](...)` calls self.run
    try:
        yield recorder
    finally:
        for fn in fns:
            del fn.run


def problems(rec):
    """Why a record fails the check, as short phrases (empty: it passes)."""
    out = []
    if "error" in rec:
        lines = [line for line in rec["error"].strip().splitlines() if line.strip()]
        out.append("compile error: " + " ... ".join(dict.fromkeys([lines[0], lines[-1]]))[:300])  # where, and why
    if rec.get("spills"):
        out.append(f"{rec['spills']} bytes of local memory per thread (spills)")
    if rec.get("shared", 0) > SM[rec["arch"]]["shared_per_block"]:
        out.append(f"{rec['shared']} bytes of shared memory > {SM[rec['arch']]['shared_per_block']}")
    for axis, (n, cap) in enumerate(zip(rec["grid"], GRID_LIMITS)):
        if n > cap:
            out.append(f"grid axis {axis} is {n} blocks > {cap}")
    return out


def occupancy(regs, warps, shared, arch):
    """Resident blocks per SM and the share of the SM's 64 warp slots they fill, limited by
    registers (allocated per warp in units of 256), shared memory (1 KiB reserved per block) and
    the block limit."""
    per_warp = math.ceil(regs * 32 / 256) * 256
    by_regs = REGS_PER_SM // (per_warp * warps)
    by_shared = SM[arch]["shared_per_sm"] // (shared + 1024)
    blocks = min(by_regs, by_shared, MAX_BLOCKS_PER_SM, MAX_WARPS_PER_SM // warps)
    return blocks, blocks * warps / MAX_WARPS_PER_SM


def compile_cases(cases, arch, compile=True):
    """Drive each (name, only, fn) case under compiled_for(arch); a case whose compile fails is
    recorded and the next case runs."""
    recorder = Recorder()
    with compiled_for(arch, recorder, compile):
        for name, only, case in cases:
            recorder.case, recorder.only = name, only
            try:
                case()
            except Exception as e:
                if not recorder.records or "error" not in recorder.records[-1]:
                    recorder.records.append(dict(kernel="?", case=name, arch=arch, grid=(), error=error_text(e)))
    return recorder.records


def in_subprocess(python, args, timeout=None, env=None):
    """Run `python -m lab.gpu_compile ARGS --json=FILE` (another interpreter: another Triton) in a
    fresh process and a fresh Triton cache (compile times from nothing); return what it wrote:
    the interpreter's versions and its records."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "records.json")
        env = {**os.environ, **(env or {}), "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": os.path.join(tmp, "cache"),
               "PYTHONPATH": root}
        p = subprocess.run([python, "-m", "lab.gpu_compile", *args, f"--json={path}"], cwd=root, env=env,
                           capture_output=True, text=True, timeout=timeout)
        if not os.path.exists(path):
            raise RuntimeError(f"{python} -m lab.gpu_compile {' '.join(args)} wrote nothing (exit {p.returncode}):\n"
                               f"{p.stdout[-2000:]}{p.stderr[-4000:]}")
        with open(path) as f:
            return json.load(f)


def launch_text(r):
    c = r.get("constexprs", {})
    if r["kernel"].startswith("_scan"):
        tiles = f"block_d {c.get('BLOCK_D')}, ckpt {c.get('CKPT')}"
    elif r["kernel"] == "_flash_bwd_pre_kernel":
        tiles = f"{c.get('BLOCK_M')} rows"
    else:
        tiles = f"{c.get('BLOCK_M')}x{c.get('BLOCK_N')}"
    return f"{tiles}, {r.get('warps')}w/{r.get('stages')}s"


def variant_text(r):
    c = r.get("constexprs", {})
    if r["kernel"] == "_scan_fwd_kernel":
        return r["case"] + (", training (writes checkpoints)" if c.get("SAVE_CKPT") else ", no grad, from a state")
    return r["case"]


def print_table(records):
    print("| kernel | variant | arch | launch | registers | spills (B) | shared (B) | grid | compile s | problems |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in records:
        print(f"| {r['kernel']} | {variant_text(r)} | sm_{r['arch']} | {launch_text(r)} | {r.get('regs', '-')} | "
              f"{r.get('spills', '-')} | {r.get('shared', '-')} | {'x'.join(map(str, r['grid']))} | "
              f"{r.get('compile_s', float('nan')):.1f} | {'; '.join(problems(r))} |")


def versions():
    import triton
    return dict(python=platform.python_version(), torch=torch.__version__, triton=triton.__version__)


def main(argv):
    os.environ["TRITON_INTERPRET"] = "0"  # before kernels is imported: its kernels must be real JIT functions
    usage = "usage: python -m lab.gpu_compile [--cases=handful|all|sweep|wide] [--arch=90,80] [--launches-only] [--json=FILE]"
    opts = dict(a[2:].partition("=")[::2] for a in argv if a.startswith("--"))
    unknown = [a for a in argv if not a.startswith("--") or a[2:].partition("=")[0] not in ("cases", "arch", "json", "launches-only")]
    if unknown:
        print(f"error: unknown argument {unknown[0]!r}; {usage}", file=sys.stderr)
        return 2
    if opts.get("cases", "handful") not in CASES:
        print(f"error: unknown case set {opts['cases']!r}; {usage}", file=sys.stderr)
        return 2
    try:
        archs = [int(a) for a in (opts.get("arch") or "90").split(",")]
        assert all(a in SM for a in archs)
    except (ValueError, AssertionError):
        print(f"error: --arch takes compute capabilities from {sorted(SM)}, e.g. --arch=90,80", file=sys.stderr)
        return 2
    cases = CASES[opts.get("cases", "handful")]()
    t0 = time.perf_counter()
    records = []
    for arch in archs:
        records += compile_cases(cases, arch, compile="launches-only" not in opts)
    if opts.get("json"):
        with open(opts["json"], "w") as f:
            json.dump(dict(versions(), wall_s=time.perf_counter() - t0, records=records), f)
    else:
        print_table(records)
    bad = [r for r in records if problems(r)]
    for r in bad:
        if "error" in r:
            print(f"\n{r['kernel']} ({r['case']}, sm_{r['arch']}):\n{r['error']}", file=sys.stderr)
    if bad:
        print(f"{len(bad)} of {len(records)} variants fail the check", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
