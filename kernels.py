"""
Shared kernels: FlashAttention and the Mamba selective scan.

Each fast path has a plain-PyTorch twin that reads like the math and is the ground truth
in the tests. The model files call only the public functions here: `attention(...)` and
`selective_scan(...)`.
"""
import math
import os

import torch
import torch.nn.functional as F

# ----------------------------------------------------------------------------- attention
# q (B, H, Tq, D), k and v (B, Hkv, Tk, D) with H a multiple of Hkv (GQA; Hkv = 1 is MQA).
# When Tq < Tk the queries are the last Tq positions (chunked prefill, decoding with a cache),
# so the causal diagonal is aligned to the end: query row r sits at absolute position Tk - Tq + r.


def attention_ref(q, k, v, causal=True, alibi_slopes=None, scale=None):
    """The formula, step by step: softmax(q k^T * scale + bias + mask) v."""
    B, H, Tq, D = q.shape
    Hkv, Tk = k.size(1), k.size(2)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    kv_head = torch.arange(H, device=q.device) // (H // Hkv)  # which K/V head each query head reads
    k, v = k[:, kv_head], v[:, kv_head]  # (B, H, Tk, D): fine for a reference, never for a kernel
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32  # softmax never in half precision
    s = (q @ k.transpose(-2, -1)).to(acc) * scale  # (B, H, Tq, Tk)
    i = torch.arange(Tk - Tq, Tk, device=q.device)[:, None]  # absolute query positions (Tq, 1)
    j = torch.arange(Tk, device=q.device)[None, :]  # key positions (1, Tk)
    if alibi_slopes is not None:
        s = s - alibi_slopes.to(acc).view(1, H, 1, 1) * (i - j).abs()  # (B, H, Tq, Tk)
    if causal:
        s = s.masked_fill(j > i, float("-inf"))
    p = torch.softmax(s, dim=-1)
    return (p.to(v.dtype) @ v)  # (B, H, Tq, D)


# FlashAttention (Dao et al. 2022; the backward in the FlashAttention-2 layout, Dao 2023).
# The T x T matrix of scores is never stored. Each program holds one tile of queries and walks
# over the keys tile by tile, keeping per query row the running maximum m, the running sum l of
# exp(s - m) and the running output; when a new tile raises the maximum, the old sum and output
# are rescaled by exp(m_old - m_new) (the "online softmax"). At the end o = acc / l and the row
# log-sum-exp m + log(l) is kept: it is all the backward needs to rebuild any tile of
# probabilities, p = exp(s - lse), without a second pass over the keys.
# The backward has three kernels and no atomic adds, so its results are bitwise repeatable:
#   preprocess  delta_i = sum_d o_id * do_id            (the softmax Jacobian's row term)
#   dK, dV      one program per key tile; it loops over every query tile of every query head that
#               shares this K/V head (GQA), so it alone writes that tile of dk and dv
#   dQ          one program per query tile; it loops over the key tiles, so it alone writes dq
# Scores are kept in base 2 (exp2 is the fast instruction): s2 = s * log2(e).
# Inside the kernels tensors are contiguous and (B, H) is flattened to one index bh = b * H + h;
# the K/V head of query head bh is then simply bh // (H // Hkv): GQA by index, no copies.
try:
    import triton
    import triton.language as tl
except ImportError:  # no Triton on this platform (macOS, Windows): only the torch paths run
    class _NoTriton:
        jit = staticmethod(lambda fn: fn)
        constexpr = None
    triton = tl = _NoTriton()

# TRITON_INTERPRET=1 runs the kernels on the CPU with numpy (how the tests run them); it must be
# set before this module is imported. numpy has no bfloat16 arithmetic, so there bf16 tiles are
# upcast to float32 right after loading.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on", "y")


@triton.jit
def _load_tile(ptr, rows, n_rows, D: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr):
    """A (rows, BLOCK_D) tile of a contiguous (n_rows, D) matrix; rows past the end and the head
    dim padding up to the power of two BLOCK_D read as zeros, so they add nothing to any dot."""
    cols = tl.arange(0, BLOCK_D)
    x = tl.load(ptr + rows[:, None] * D + cols[None, :], mask=(rows[:, None] < n_rows) & (cols[None, :] < D), other=0.0)
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def _store_tile(ptr, x, rows, n_rows, D: tl.constexpr, BLOCK_D: tl.constexpr):
    cols = tl.arange(0, BLOCK_D)
    tl.store(ptr + rows[:, None] * D + cols[None, :], x.to(ptr.dtype.element_ty),
             mask=(rows[:, None] < n_rows) & (cols[None, :] < D))


@triton.jit
def _fwd_tiles(acc, m_i, l_i, q, K, V, pos_q, slope, qk_scale, lo, hi, Tk,
               CAUSAL: tl.constexpr, ALIBI: tl.constexpr, MASK: tl.constexpr, D: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """Fold key tiles [lo, hi) into the running (acc, m, l) of one query tile. MASK=False is the
    fast loop for tiles that lie wholly inside the sequence and below the causal diagonal."""
    for start in range(lo, hi, BLOCK_N):
        pos_k = start + tl.arange(0, BLOCK_N)  # key positions of this tile
        k = _load_tile(K, pos_k, Tk, D, BLOCK_D, UPCAST)  # (BLOCK_N, BLOCK_D)
        v = _load_tile(V, pos_k, Tk, D, BLOCK_D, UPCAST)  # (BLOCK_N, BLOCK_D)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N) base-2 scores
        if ALIBI:  # the bias -slope * |i - j|, computed here instead of read from a (T, T) tensor
            s -= slope * tl.abs(pos_q[:, None] - pos_k[None, :]).to(tl.float32)
        if MASK:
            keep = pos_k[None, :] < Tk
            if CAUSAL:
                keep = keep & (pos_k[None, :] <= pos_q[:, None])
            s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # (BLOCK_M,)
        p = tl.exp2(s - m_new[:, None])  # (BLOCK_M, BLOCK_N)
        alpha = tl.exp2(m_i - m_new)  # rescales what was summed under the old maximum
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)  # (BLOCK_M, BLOCK_D)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _flash_fwd_kernel(Q, K, V, O, LSE, SLOPES, scale, Tq, Tk, H, GROUP,
                      CAUSAL: tl.constexpr, ALIBI: tl.constexpr, D: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                      UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    m0 = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M  # the longest causal rows start first
    bh = tl.program_id(1).to(tl.int64)  # b * H + h
    Q += bh * Tq * D
    O += bh * Tq * D
    K += (bh // GROUP) * Tk * D  # the shared K/V head
    V += (bh // GROUP) * Tk * D
    rows = m0 + tl.arange(0, BLOCK_M)
    pos_q = Tk - Tq + rows  # absolute positions of the queries
    qk_scale = scale * 1.4426950408889634  # log2(e): base-2 scores
    slope = 0.0
    if ALIBI:
        slope = tl.load(SLOPES + bh % H) * 1.4426950408889634
    q = _load_tile(Q, rows, Tq, D, BLOCK_D, UPCAST)  # (BLOCK_M, BLOCK_D)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # Key 0 is visible to every row (Tq <= Tk when causal), so after the first tile every row
    # has a finite maximum and exp2(-inf - m) is a clean 0 for masked entries.
    if CAUSAL:
        hi_full = tl.minimum(Tk, Tk - Tq + m0 + 1)  # keys that every row of this tile may see
        hi = tl.minimum(Tk, Tk - Tq + m0 + BLOCK_M)  # keys that some row may see
    else:
        hi_full = Tk
        hi = Tk
    hi_full = hi_full // BLOCK_N * BLOCK_N
    acc, m_i, l_i = _fwd_tiles(acc, m_i, l_i, q, K, V, pos_q, slope, qk_scale, 0, hi_full, Tk,
                               CAUSAL, ALIBI, False, D, BLOCK_N, BLOCK_D, UPCAST, PRECISION)
    acc, m_i, l_i = _fwd_tiles(acc, m_i, l_i, q, K, V, pos_q, slope, qk_scale, hi_full, hi, Tk,
                               CAUSAL, ALIBI, True, D, BLOCK_N, BLOCK_D, UPCAST, PRECISION)
    _store_tile(O, acc / l_i[:, None], rows, Tq, D, BLOCK_D)
    tl.store(LSE + bh * Tq + rows, (m_i + tl.log2(l_i)) * 0.6931471805599453, mask=rows < Tq)  # natural log


@triton.jit
def _flash_bwd_pre_kernel(O, DO, DELTA, Tq, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    bh = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    o = _load_tile(O + bh * Tq * D, rows, Tq, D, BLOCK_D, True)  # always float32 here
    do = _load_tile(DO + bh * Tq * D, rows, Tq, D, BLOCK_D, True)
    tl.store(DELTA + bh * Tq + rows, tl.sum(o * do, 1), mask=rows < Tq)


@triton.jit
def _dkdv_tiles(dk, dv, k, v, Q, DO, LSE, DELTA, pos_k, slope, qk_scale, lo, hi, Tq, Tk,
                ALIBI: tl.constexpr, CAUSAL: tl.constexpr, D: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """Add the query tiles [lo, hi) of one query head to one key tile's dk, dv. Works with the
    transposed tile (keys x queries) so that dv and dk come out of plain dots."""
    for start in range(lo, hi, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        pos_q = Tk - Tq + rows
        q = _load_tile(Q, rows, Tq, D, BLOCK_D, UPCAST)  # (BLOCK_M, BLOCK_D)
        do = _load_tile(DO, rows, Tq, D, BLOCK_D, UPCAST)
        lse = tl.load(LSE + rows, mask=rows < Tq, other=0.0) * 1.4426950408889634
        delta = tl.load(DELTA + rows, mask=rows < Tq, other=0.0)
        sT = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale - lse[None, :]  # (BLOCK_N, BLOCK_M)
        if ALIBI:
            sT -= slope * tl.abs(pos_q[None, :] - pos_k[:, None]).to(tl.float32)
        if CAUSAL:
            sT = tl.where(pos_k[:, None] <= pos_q[None, :], sT, float("-inf"))
        pT = tl.exp2(sT)  # probabilities, rebuilt from the row log-sum-exp (BLOCK_N, BLOCK_M)
        dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=PRECISION)  # dv += p^T do
        dpT = tl.dot(v, tl.trans(do), input_precision=PRECISION)  # (dO V^T)^T (BLOCK_N, BLOCK_M)
        dsT = pT * (dpT - delta[None, :])  # softmax backward: ds = p * (dp - delta)
        dk = tl.dot(dsT.to(q.dtype), q, dk, input_precision=PRECISION)  # dk += ds^T q
    return dk, dv


@triton.jit
def _flash_bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, SLOPES, scale, Tq, Tk, H, GROUP,
                           CAUSAL: tl.constexpr, ALIBI: tl.constexpr, D: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                           UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    n0 = tl.program_id(0) * BLOCK_N
    bhk = tl.program_id(1).to(tl.int64)  # b * Hkv + hk
    K += bhk * Tk * D
    V += bhk * Tk * D
    pos_k = n0 + tl.arange(0, BLOCK_N)
    k = _load_tile(K, pos_k, Tk, D, BLOCK_D, UPCAST)  # (BLOCK_N, BLOCK_D)
    v = _load_tile(V, pos_k, Tk, D, BLOCK_D, UPCAST)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    qk_scale = scale * 1.4426950408889634
    # Padding needs no mask here: a query row past Tq reads q = do = 0 and lse = delta = 0, so its
    # p is finite and it adds exactly 0 to dk and dv; a key row past Tk only feeds its own row of
    # dk and dv, which is never stored. Only the causal mask remains. (One loop that masks every
    # tile, rather than a masked and an unmasked loop as in the forward: with two loops the
    # compiler spilled registers inside them, sm_90, D=128.)
    m_lo = 0
    if CAUSAL:  # query tiles wholly before this key tile see none of it
        m_lo = tl.maximum(n0 - (Tk - Tq), 0) // BLOCK_M * BLOCK_M
    for g in range(GROUP):  # every query head that reads this K/V head
        bh = bhk * GROUP + g
        slope = 0.0
        if ALIBI:
            slope = tl.load(SLOPES + bh % H) * 1.4426950408889634
        Qh, DOh, LSEh, DELTAh = Q + bh * Tq * D, DO + bh * Tq * D, LSE + bh * Tq, DELTA + bh * Tq
        dk, dv = _dkdv_tiles(dk, dv, k, v, Qh, DOh, LSEh, DELTAh, pos_k, slope, qk_scale, m_lo, Tq, Tq, Tk,
                             ALIBI, CAUSAL, D, BLOCK_M, BLOCK_D, UPCAST, PRECISION)
    _store_tile(DK + bhk * Tk * D, dk * scale, pos_k, Tk, D, BLOCK_D)
    _store_tile(DV + bhk * Tk * D, dv, pos_k, Tk, D, BLOCK_D)


@triton.jit
def _dq_tiles(dq, q, do, lse, delta, K, V, pos_q, slope, qk_scale, lo, hi, Tq, Tk,
              CAUSAL: tl.constexpr, ALIBI: tl.constexpr, MASK: tl.constexpr, D: tl.constexpr,
              BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """Add the key tiles [lo, hi) to one query tile's dq."""
    for start in range(lo, hi, BLOCK_N):
        pos_k = start + tl.arange(0, BLOCK_N)
        k = _load_tile(K, pos_k, Tk, D, BLOCK_D, UPCAST)  # (BLOCK_N, BLOCK_D)
        v = _load_tile(V, pos_k, Tk, D, BLOCK_D, UPCAST)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale - lse[:, None]  # (BLOCK_M, BLOCK_N)
        if ALIBI:
            s -= slope * tl.abs(pos_q[:, None] - pos_k[None, :]).to(tl.float32)
        if MASK:
            keep = pos_k[None, :] < Tk
            if CAUSAL:
                keep = keep & (pos_k[None, :] <= pos_q[:, None])
            s = tl.where(keep, s, float("-inf"))
        p = tl.exp2(s)  # (BLOCK_M, BLOCK_N)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)  # (BLOCK_M, BLOCK_N)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)  # dq += ds k
    return dq


@triton.jit
def _flash_bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, SLOPES, scale, Tq, Tk, H, GROUP,
                         CAUSAL: tl.constexpr, ALIBI: tl.constexpr, D: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                         UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    m0 = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M  # the longest causal rows start first
    bh = tl.program_id(1).to(tl.int64)
    K += (bh // GROUP) * Tk * D
    V += (bh // GROUP) * Tk * D
    rows = m0 + tl.arange(0, BLOCK_M)
    pos_q = Tk - Tq + rows
    qk_scale = scale * 1.4426950408889634
    slope = 0.0
    if ALIBI:
        slope = tl.load(SLOPES + bh % H) * 1.4426950408889634
    q = _load_tile(Q + bh * Tq * D, rows, Tq, D, BLOCK_D, UPCAST)  # (BLOCK_M, BLOCK_D)
    do = _load_tile(DO + bh * Tq * D, rows, Tq, D, BLOCK_D, UPCAST)
    # Rows past Tq read lse = 0 and zero q, do: finite garbage in rows that are never stored.
    lse = tl.load(LSE + bh * Tq + rows, mask=rows < Tq, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + bh * Tq + rows, mask=rows < Tq, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if CAUSAL:  # as in the forward: [0, hi_full) unmasked, [hi_full, hi) masked
        hi_full = tl.minimum(Tk, Tk - Tq + m0 + 1)
        hi = tl.minimum(Tk, Tk - Tq + m0 + BLOCK_M)
    else:
        hi_full = Tk
        hi = Tk
    hi_full = hi_full // BLOCK_N * BLOCK_N
    dq = _dq_tiles(dq, q, do, lse, delta, K, V, pos_q, slope, qk_scale, 0, hi_full, Tq, Tk,
                   CAUSAL, ALIBI, False, D, BLOCK_N, BLOCK_D, UPCAST, PRECISION)
    dq = _dq_tiles(dq, q, do, lse, delta, K, V, pos_q, slope, qk_scale, hi_full, hi, Tq, Tk,
                   CAUSAL, ALIBI, True, D, BLOCK_N, BLOCK_D, UPCAST, PRECISION)
    _store_tile(DQ + bh * Tq * D, dq * scale, rows, Tq, D, BLOCK_D)


# Launch settings for Hopper-class GPUs: (BLOCK_M, BLOCK_N, num_warps, num_stages), one fixed
# choice per kernel and head-dim class, no autotuning (it does not run under the interpreter).
def _config(kernel, D, dtype):
    if dtype == torch.float32:  # exact fp32 dots run on the FMA units: small tiles fit the registers
        return 32, 32, 4, 2     # (and compile in seconds instead of a minute)
    warps = 8 if D > 64 else 4
    if kernel == "fwd":
        return 128, 64, warps, 3
    return 64, 64, warps, 2  # dkdv and dq: two fp32 accumulators (dk, dv) per program


def _new_output(shape, dtype, device):
    """Every buffer a kernel must fill comes from here (the tests swap in NaN-filled ones)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _kernel_flags(q, D):
    return dict(D=D, BLOCK_D=max(16, triton.next_power_of_2(D)),
                UPCAST=INTERPRET and q.dtype == torch.bfloat16,
                PRECISION="ieee" if q.dtype == torch.float32 else "tf32")  # fp32 stays fp32 (no TF32)


def _flash_forward(q, k, v, causal, slopes, scale):
    """q, k, v contiguous; returns o (B, H, Tq, D) and the row log-sum-exp lse (B, H, Tq) in float32."""
    B, H, Tq, D = q.shape
    Hkv, Tk = k.size(1), k.size(2)
    o = _new_output(q.shape, q.dtype, q.device)
    lse = _new_output((B, H, Tq), torch.float32, q.device)
    BM, BN, warps, stages = _config("fwd", D, q.dtype)
    _flash_fwd_kernel[(triton.cdiv(Tq, BM), B * H)](
        q, k, v, o, lse, q if slopes is None else slopes, scale, Tq, Tk, H, H // Hkv,
        CAUSAL=causal, ALIBI=slopes is not None, BLOCK_M=BM, BLOCK_N=BN, **_kernel_flags(q, D),
        num_warps=warps, num_stages=stages)
    return o, lse


def _flash_backward(q, k, v, o, lse, do, causal, slopes, scale):
    B, H, Tq, D = q.shape
    Hkv, Tk = k.size(1), k.size(2)
    flags = _kernel_flags(q, D)
    delta = _new_output((B, H, Tq), torch.float32, q.device)
    _flash_bwd_pre_kernel[(triton.cdiv(Tq, 64), B * H)](o, do, delta, Tq, D=D, BLOCK_M=64, BLOCK_D=flags["BLOCK_D"])
    dq, dk, dv = (_new_output(x.shape, x.dtype, x.device) for x in (q, k, v))
    slopes_ptr = q if slopes is None else slopes
    BM, BN, warps, stages = _config("dkdv", D, q.dtype)
    _flash_bwd_dkdv_kernel[(triton.cdiv(Tk, BN), B * Hkv)](
        q, k, v, do, lse, delta, dk, dv, slopes_ptr, scale, Tq, Tk, H, H // Hkv,
        CAUSAL=causal, ALIBI=slopes is not None, BLOCK_M=BM, BLOCK_N=BN, **flags, num_warps=warps, num_stages=stages)
    BM, BN, warps, stages = _config("dq", D, q.dtype)
    _flash_bwd_dq_kernel[(triton.cdiv(Tq, BM), B * H)](
        q, k, v, do, lse, delta, dq, slopes_ptr, scale, Tq, Tk, H, H // Hkv,
        CAUSAL=causal, ALIBI=slopes is not None, BLOCK_M=BM, BLOCK_N=BN, **flags, num_warps=warps, num_stages=stages)
    return dq, dk, dv


class FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, slopes, scale):
        o, lse = _flash_forward(q, k, v, causal, slopes, scale)
        ctx.save_for_backward(q, k, v, o, lse, slopes)
        ctx.causal, ctx.scale = causal, scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, slopes = ctx.saved_tensors
        dq, dk, dv = _flash_backward(q, k, v, o, lse, do.contiguous(), ctx.causal, slopes, ctx.scale)
        return dq, dk, dv, None, None, None  # the ALiBi slopes are fixed, not learned


def attention(q, k, v, causal=True, alibi_slopes=None, scale=None, impl=None):
    """Fast path. impl: None picks Triton for CUDA tensors (head dims up to 128) and torch's
    scaled_dot_product_attention otherwise; "triton" or "torch" forces one (forcing "triton"
    on the CPU needs TRITON_INTERPRET=1)."""
    B, H, Tq, D = q.shape
    Hkv, Tk = k.size(1), k.size(2)
    if H % Hkv:
        raise ValueError(f"n_head={H} must be a multiple of the K/V heads={Hkv}")
    if causal and Tq > Tk:
        raise ValueError(f"causal attention needs Tq={Tq} <= Tk={Tk}: the queries are the last Tq positions")
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    if impl is None:
        impl = "triton" if q.is_cuda and D <= 128 else "torch"
    if impl == "triton":
        # Like SDPA: follow autocast, and bring k and v (a float32 KV cache, say) to q's dtype.
        dev = q.device.type
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else q.dtype
        q, k, v = (x.to(dtype).contiguous() for x in (q, k, v))
        slopes = None if alibi_slopes is None else alibi_slopes.to(device=q.device, dtype=torch.float32).contiguous()
        return FlashAttention.apply(q, k, v, causal, slopes, scale)
    mask = None
    if alibi_slopes is not None or (causal and Tq != Tk):  # SDPA's own is_causal aligns to the start
        i = torch.arange(Tk - Tq, Tk, device=q.device)[:, None]
        j = torch.arange(Tk, device=q.device)[None, :]
        mask = torch.zeros(Tq, Tk, device=q.device, dtype=q.dtype)
        if causal:
            mask = mask.masked_fill(j > i, float("-inf"))
        if alibi_slopes is not None:
            mask = mask - (alibi_slopes.view(H, 1, 1) * (i - j).abs()).to(q.dtype)  # (H, Tq, Tk)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None,
                                          scale=scale, enable_gqa=H != Hkv)


# ----------------------------------------------------------------------------- selective scan
# (arrives with the Mamba issue)
