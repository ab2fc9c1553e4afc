"""
results/gpu_compile.md: every kernel variant compiled for sm_90 and sm_80 by lab.gpu_compile, under
this interpreter's Triton and other environments' (other Triton versions), with what the figures
mean: the occupancy a register cap leaves, a predicted time at the H200's limits for each kernel at
the GPU benchmark's shapes, and the bytes each launch setting of the scan backward moves.

    python -m lab.bench gpu_compile [--python=OTHER_ENV/bin/python]
"""
import math
import os
import platform
import sys
import time

from lab.gpu_compile import H200, REG_CAP, SM, SWEEP, in_subprocess, launch_text, occupancy, problems, variant_text


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


