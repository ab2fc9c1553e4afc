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
    python -m lab.bench gpu_compile                 # results/gpu_compile.md (see write_page)

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


# ----------------------------------------------------------------------------- the page
# Predictions at the H200's limits: a kernel takes at least its matmul FLOPs / 989e12 s and its
# HBM bytes / 4.8e12 s; the larger is the prediction. Bytes are what must cross HBM once (inputs
# read, outputs written); the re-reads of K and V (forward, dQ) and of Q and dO (dK dV) by every
# tile of a head are counted as L2 hits, since the tiles of one head run side by side.
ATTENTION_SHAPES = [(4, 16, 4096, 128), (16, 12, 1024, 64)]  # (B, H, T, D), causal, bf16: the GPU benchmark's
SCAN_SHAPE = (32, 1024, 16, 2048)  # (B, D, N, L), bf16: the GPU benchmark's


def attention_work(kernel, B, H, T, D, causal=True, elem=2):
    """(matmul FLOPs executed, HBM bytes) of one kernel. A (T x T x D) matmul is 2 T^2 D FLOPs
    (halved when causal); the forward does 2 of them, dK dV 4 (S again, dP, dV, dK), dQ 3 (S,
    dP, dQ): the backward executes 3.5x the forward's matmuls where benchmarks credit 2.5x."""
    mm = 2 * B * H * T * T * D * (0.5 if causal else 1.0)
    io, row = B * H * T * D * elem, B * H * T * 4  # one (B, H, T, D) tensor; one float per row
    return {"_flash_fwd_kernel": (2 * mm, 4 * io + row),  # q, k, v in; o, lse out
            "_flash_bwd_pre_kernel": (0.0, 2 * io + row),  # o, do in; delta out
            "_flash_bwd_dkdv_kernel": (4 * mm, 6 * io + 2 * row),  # q, k, v, do, lse, delta in; dk, dv out
            "_flash_bwd_dq_kernel": (3 * mm, 5 * io + 2 * row)}[kernel]  # q, k, v, do, lse, delta in; dq out


def scan_work(kernel, B, Dm, N, L, block_d, ckpt, scratch_in_l2, elem=2, training=True):
    """(HBM bytes, exp2 count) of one scan kernel. The forward reads u, delta, z, B, C and writes
    out (and, training, a float32 state every ckpt steps); the backward reads those inputs, dout
    and the checkpoints, writes du, ddelta, dz and per-channel-block float32 partials of dB and
    dC (which torch then reads to sum), and, unless it stays in L2, writes and reads every state
    of the sequence through the scratch buffer. One exp2 per (b, d, n, t) in the forward, two in
    the backward (recomputing the segment, then the decay)."""
    BN = 1 << (N - 1).bit_length()
    io, bc = B * Dm * L * elem, B * N * L * elem
    ckpts = B * math.ceil(L / ckpt) * Dm * BN * 4
    exps = B * Dm * L * BN
    if kernel == "_scan_fwd_kernel":
        return (4 * io + 2 * bc + (ckpts if training else 2 * B * Dm * N * 4), exps)
    partials = 2 * B * math.ceil(Dm / block_d) * L * N * 4
    scratch = 0 if scratch_in_l2 else 2 * B * L * Dm * BN * 4
    return (7 * io + 2 * bc + ckpts + 2 * partials + scratch, 2 * exps)


def scratch_live_bytes(rec, B, Dm, N):
    """The backward's scratch buffer held by the programs resident at once on an H200."""
    c = rec["constexprs"]
    blocks, _ = occupancy(rec["regs"], rec["warps"], rec["shared"], 90)
    programs = min(B * math.ceil(Dm / c["BLOCK_D"]), blocks * H200["sms"])
    return programs * c["CKPT"] * c["BLOCK_D"] * c["BLOCK_N"] * 4


def cell(values, fmt="{}"):
    """One table cell for the same figure under each Triton version: 'a' if equal, else 'a / b'."""
    texts = ["-" if v is None else fmt.format(v) for v in values]
    return texts[0] if len(set(texts)) == 1 else " / ".join(texts)


def occupancy_text(r):
    if "regs" not in r:
        return None
    blocks, share = occupancy(r["regs"], r["warps"], r["shared"], r["arch"])
    return f"{blocks} ({share:.0%})"


def joined(runs, key):
    """Records of the same (kernel, variant, arch) across runs: {(kernel, variant, arch): [rec or None per run]}."""
    rows = {}
    for i, run in enumerate(runs):
        for r in run[key]:
            rows.setdefault((r["kernel"], variant_text(r), r["arch"]), [None] * len(runs))[i] = r
    return rows


def page(runs, command):
    """results/gpu_compile.md from one run per interpreter: {python, torch, triton, wall_s,
    records (every variant, sm_90 and sm_80), sweep (SWEEP's settings, sm_90 and sm_80)}."""
    tv = [r["triton"] for r in runs]
    vs = " / ".join(f"Triton {v}" for v in tv)
    out = ["# The Triton kernels compiled for Hopper and Ampere, without a GPU", "",
           "Every kernel launch of `kernels.attention` (forward, backward) and `kernels.selective_scan` (forward, "
           "backward, no-grad forward) compiled for sm_90 (H100/H200) and sm_80 (A100) on a CPU-only machine "
           "(`lab/gpu_compile.py`: the launches are caught and compiled, not run). Registers and local memory "
           "(spills) per thread come from the cubin (`cuobjdump -res-usage`), shared memory per block from "
           "Triton's allocation. Nothing here was measured on a GPU: speeds are predictions.", "",
           f"    {command}", "",
           f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared; compile "
           "times are wall seconds on it, from an empty Triton cache). Versions checked:", "",
           "| interpreter | Python | torch | Triton | variants | failing the check | wall time |", "|---|---|---|---|---|---|---|"]
    for run in runs:
        bad = sum(1 for r in run["records"] if problems(r))
        out.append(f"| `{run['python']}` | {run['python_version']} | {run['torch']} | {run['triton']} | "
                   f"{len(run['records'])} | {bad} | {run['wall_s'] / 60:.1f} min |")
    out += ["", "## Summary", "", "| Triton | arch | variants | compile errors | spilling | over shared memory | "
            "registers (min-max) | at the 255 cap | compile s (sum) |", "|---|---|---|---|---|---|---|---|---|"]
    for run in runs:
        for arch in sorted({r["arch"] for r in run["records"]}, reverse=True):
            rs = [r for r in run["records"] if r["arch"] == arch]
            ok = [r for r in rs if "regs" in r]
            regs = [r["regs"] for r in ok]
            out.append(f"| {run['triton']} | sm_{arch} | {len(rs)} | {sum('error' in r for r in rs)} | "
                       f"{sum(bool(r.get('spills')) for r in rs)} | "
                       f"{sum(r.get('shared', 0) > SM[arch]['shared_per_block'] for r in rs)} | "
                       f"{min(regs, default=0)}-{max(regs, default=0)} | {sum(x >= REG_CAP for x in regs)} | "
                       f"{sum(r.get('compile_s', 0) for r in rs):.0f} |")
    out += page_capped(runs, vs) + page_predictions(runs, vs) + page_scan_bytes(runs, vs)
    out += ["", f"## Every variant ({vs})", "",
            "Occupancy: thread blocks resident per SM, and the share of its 64 warp slots they fill, from registers, "
            "shared memory and warps (the CUDA occupancy rules; 65536 registers per SM).", "",
            "| kernel | variant | arch | launch | registers | spills (B) | shared (KiB) | blocks/SM (warps) | compile s | problems |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for (kernel, variant, arch), recs in joined(runs, "records").items():
        first = next(r for r in recs if r)
        out.append(f"| {kernel} | {variant} | sm_{arch} | {launch_text(first)} | {cell([r and r.get('regs') for r in recs])} | "
                   f"{cell([r and r.get('spills') for r in recs])} | "
                   f"{cell([r and r.get('shared') and r['shared'] / 1024 for r in recs], '{:.1f}')} | "
                   f"{cell([r and occupancy_text(r) for r in recs])} | "
                   f"{cell([r and r.get('compile_s') for r in recs], '{:.1f}')} | "
                   f"{cell(['; '.join(problems(r)) if r else 'not compiled' for r in recs])} |")
    return "\n".join(out) + "\n"


def page_capped(runs, vs):
    out = ["", "## Register cap and other launch settings", ""]
    for run in runs:
        for arch in sorted({r["arch"] for r in run["records"]}, reverse=True):
            rs = [r for r in run["records"] if r["arch"] == arch and "regs" in r]
            capped = sorted({f"{r['kernel']} ({variant_text(r)})" for r in rs if r["regs"] >= REG_CAP})
            top = max(rs, key=lambda r: r["regs"], default=None)
            spilling = sum(bool(r["spills"]) for r in rs)
            text = f"Triton {run['triton']}, sm_{arch}: " + (
                f"{len(capped)} variants at the {REG_CAP}-register cap: " + "; ".join(capped) if capped else
                f"none at the {REG_CAP}-register cap (the most: {top['regs']}, {top['kernel']}, {variant_text(top)})" if top else "none compiled")
            text += f"; {spilling} spilling." if spilling else "; none spilling."
            out += [text, ""]
    out += ["The launch settings are chosen for Hopper (sm_90); where sm_80 spills, an A100 run needs its own "
            "(`KERNEL_CONFIG`; the table below shows which settings fit there)."]
    out.append("")
    out += ["A kernel at the cap has as many registers as a thread can hold: one more live value spills, and the "
            "SM holds at most 8 warps of it (one 8-warp block, 12.5% of the warp slots), so memory latency is "
            "hidden only by the pipelining inside each block. The launch settings a GPU sweep tries "
            "(`KERNEL_CONFIG`, the default first), compiled for sm_90 and sm_80 at bf16 (attention D=128, the scan "
            f"at N=16 and 64) ({vs}):", "",
            "| kernel | setting | arch | registers | spills (B) | shared (KiB) | blocks/SM (warps) | problems |",
            "|---|---|---|---|---|---|---|---|"]
    for (kernel, variant, arch), recs in sorted(joined(runs, "sweep").items(), key=lambda item: -item[0][2]):
        out.append(f"| {kernel} | {variant} | sm_{arch} | {cell([r and r.get('regs') for r in recs])} | "
                   f"{cell([r and r.get('spills') for r in recs])} | "
                   f"{cell([r and r.get('shared') and r['shared'] / 1024 for r in recs], '{:.1f}')} | "
                   f"{cell([r and occupancy_text(r) for r in recs])} | "
                   f"{cell(['; '.join(problems(r)) if r else 'not compiled' for r in recs])} |")
    return out


def default_record(run, kernel, case, **constexprs):
    for r in run["records"]:
        if r["kernel"] == kernel and r["case"] == case and r["arch"] == 90 and \
                all(r["constexprs"].get(k) == v for k, v in constexprs.items()):
            return r
    return None


def page_predictions(runs, vs):
    out = ["", "## Predicted times at the H200's limits", "",
           "A kernel needs at least its matmul FLOPs / 989e12 s (dense bf16 tensor cores) and its HBM bytes / "
           "4.8e12 s; the larger is the prediction, at the launch settings the code chooses (sm_90 registers "
           f"and occupancy: {vs}). Causal, bf16. Bytes count each input read and each output written once: the "
           "re-reads of K, V (or Q, dO) by every tile of a head are taken as L2 hits. Matmul FLOPs are those "
           "executed: the backward recomputes S in both of its kernels, so it executes 3.5x the forward's "
           "matmuls where benchmarks (and bench's TFLOP/s) credit 2.5x.", "",
           "| kernel | shape | launch | registers | blocks/SM (warps) | matmul GFLOP | HBM MB | FLOP time ms | "
           "byte time ms | predicted ms |", "|---|---|---|---|---|---|---|---|---|---|"]
    for B, H, T, D in ATTENTION_SHAPES:
        total = [0.0, 0.0]
        case = f"attention bf16 D={D}"
        for kernel in ("_flash_fwd_kernel", "_flash_bwd_pre_kernel", "_flash_bwd_dkdv_kernel", "_flash_bwd_dq_kernel"):
            recs = [default_record(run, kernel, case) for run in runs]
            flops, nbytes = attention_work(kernel, B, H, T, D)
            t_f, t_b = flops / H200["matmul_flops"] * 1e3, nbytes / H200["hbm_bytes"] * 1e3
            total[0 if kernel == "_flash_fwd_kernel" else 1] += max(t_f, t_b)
            first = next((r for r in recs if r), None)
            out.append(f"| {kernel} | B{B} H{H} T{T} D{D} | {launch_text(first) if first else '-'} | "
                       f"{cell([r and r.get('regs') for r in recs])} | {cell([r and occupancy_text(r) for r in recs])} | "
                       f"{flops / 1e9:.0f} | {nbytes / 1e6:.0f} | {t_f:.3f} | {t_b:.3f} | **{max(t_f, t_b):.3f}** |")
        fwd_flops = attention_work("_flash_fwd_kernel", B, H, T, D)[0]
        out.append(f"| forward + backward | B{B} H{H} T{T} D{D} | | | | | | | | **{sum(total):.3f}** "
                   f"(fwd {fwd_flops / total[0] / 1e9:.0f}, bwd {2.5 * fwd_flops / total[1] / 1e9:.0f} TFLOP/s as bench counts) |")
    B, Dm, N, L = SCAN_SHAPE
    out += ["", f"The scan has no matmul: it is bound by HBM bytes or by exp2, which runs at 16 per clock per SM "
            f"(the CUDA guide's throughput table, compute capability 9.0): {H200['exp2_per_s'] / 1e12:.2f}e12 per "
            f"second at 1.98 GHz on 132 SMs. B={B} D={Dm} N={N} L={L}, bf16 inputs; the backward's scratch buffer "
            "taken to stay in L2 (next section).", "",
            "| kernel | launch | registers | blocks/SM (warps) | HBM MB | exp2 (1e9) | byte time ms | exp2 time ms | predicted ms |",
            "|---|---|---|---|---|---|---|---|---|"]
    case = f"scan bf16 N={N}"
    for kernel, training in (("_scan_fwd_kernel", True), ("_scan_fwd_kernel", False), ("_scan_bwd_kernel", True)):
        extra = dict(SAVE_CKPT=training) if kernel == "_scan_fwd_kernel" else {}
        recs = [default_record(run, kernel, case, **extra) for run in runs]
        first = next((r for r in recs if r), None)
        if first is None:
            continue
        c = first["constexprs"]
        nbytes, exps = scan_work(kernel, B, Dm, N, L, c["BLOCK_D"], c["CKPT"], True, training=training)
        t_b, t_e = nbytes / H200["hbm_bytes"] * 1e3, exps / H200["exp2_per_s"] * 1e3
        name = kernel + ("" if kernel == "_scan_bwd_kernel" else " (training)" if training else " (no grad)")
        out.append(f"| {name} | {launch_text(first)} | {cell([r and r.get('regs') for r in recs])} | "
                   f"{cell([r and occupancy_text(r) for r in recs])} | {nbytes / 1e6:.0f} | {exps / 1e9:.2f} | "
                   f"{t_b:.3f} | {t_e:.3f} | **{max(t_b, t_e):.3f}** |")
    return out


def page_scan_bytes(runs, vs):
    B, Dm, N, L = SCAN_SHAPE
    BN = 1 << (N - 1).bit_length()
    out = ["", "## The scan backward's bytes per launch setting", "",
           f"B={B} D={Dm} N={N} L={L}, bf16. The backward recomputes each ckpt-step segment's states from its "
           f"checkpoint into a scratch buffer (B, ckpt, D, {BN}) float32, then reads them back in reverse: every "
           f"state of the sequence is written and read once, {2 * B * L * Dm * BN * 4 / 1e9:.1f} GB, cheap only "
           "while the part the resident programs use stays in the H200's 50 MB L2. Resident programs: 132 SMs "
           "x blocks per SM from registers (the first Triton version's figure). A shorter ckpt shrinks the live "
           "scratch and writes (forward) and reads (backward) more checkpoints; block_d sets the programs' number "
           "and the dB, dC partials (one per channel block). In L2 or not is a threshold here; on the GPU the "
           "change is gradual, which `python -m lab.bench sweep` measures.", "",
           "| block_d, ckpt, warps | registers | blocks/SM | live scratch MB | in L2? | checkpoints MB (written, read) | "
           "dB dC partials MB | backward HBM MB | backward predicted ms | forward predicted ms |", "|---|---|---|---|---|---|---|---|---|---|"]
    for setting in SWEEP["scan"]:
        recs = [next((r for r in run["sweep"] if r["kernel"] == "_scan_bwd_kernel" and r["case"] == f"scan bf16 N={N} scan={setting}"
                      and r["arch"] == 90 and "regs" in r), None) for run in runs]
        first = next((r for r in recs if r), None)
        if first is None:
            out.append(f"| {setting} | not compiled | | | | | | | | |")
            continue
        block_d, ckpt, _ = (int(x) for x in setting.split(","))
        live = scratch_live_bytes(first, B, Dm, N)
        in_l2 = live <= H200["l2_bytes"]
        nbytes, exps = scan_work("_scan_bwd_kernel", B, Dm, N, L, block_d, ckpt, in_l2)
        fbytes, fexps = scan_work("_scan_fwd_kernel", B, Dm, N, L, block_d, ckpt, True)
        ckpts = B * math.ceil(L / ckpt) * Dm * BN * 4
        partials = 2 * B * math.ceil(Dm / block_d) * L * N * 4
        blocks, _ = occupancy(first["regs"], first["warps"], first["shared"], 90)
        out.append(f"| {setting} | {cell([r and r.get('regs') for r in recs])} | {blocks} | {live / 1e6:.0f} | "
                   f"{'yes' if in_l2 else 'no'} | {ckpts / 1e6:.0f}, {ckpts / 1e6:.0f} | {partials / 1e6:.0f} | {nbytes / 1e6:.0f} | "
                   f"{max(nbytes / H200['hbm_bytes'], exps / H200['exp2_per_s']) * 1e3:.3f} | "
                   f"{max(fbytes / H200['hbm_bytes'], fexps / H200['exp2_per_s']) * 1e3:.3f} |")
    return out


def write_page(others, path):
    """Compile every variant and the sweep's settings with this interpreter and each of others
    (interpreters of other environments: other Tritons), then write the page whole."""
    command = "python -m lab.bench gpu_compile" + (f" --python={','.join(others)}" if others else "")
    pythons = [sys.executable, *others]
    runs = []
    for python in pythons:
        t0 = time.perf_counter()
        every = in_subprocess(python, ["--cases=all", "--arch=90,80"])
        sweep = in_subprocess(python, ["--cases=sweep", "--arch=90,80"])
        runs.append(dict(python=python, python_version=every["python"], torch=every["torch"], triton=every["triton"],
                         records=every["records"], sweep=sweep["records"], wall_s=time.perf_counter() - t0))
        print(f"{python}: Triton {every['triton']}, {len(every['records'])} variants and {len(sweep['records'])} sweep "
              f"settings in {runs[-1]['wall_s'] / 60:.1f} min", flush=True)
    with open(path, "w") as f:
        f.write(page(runs, command))
    return runs


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
