"""
Shared kernels: FlashAttention and the Mamba selective scan.

Each fast path has a plain-PyTorch twin that reads like the math and is the ground truth
in the tests. The model files call only the public functions here: `attention(...)`,
`selective_scan(...)` and, for decoding one token at a time, `selective_state_update(...)`.
They come first, each after its readable reference; the Triton machinery follows at the end.
"""
import contextlib
import math
import os

import torch
import torch.nn.functional as F

# Which device types `attention` and `selective_scan` send to Triton when impl=None. Add "cpu"
# (with TRITON_INTERPRET=1) to run the kernels' dispatch through the interpreter on a CPU.
TRITON_DEVICES = {"cuda"}
# Every buffer a Triton kernel must fill is created filled with this value (None: left
# uninitialised, the fast default). float("nan") makes an element a kernel forgot to write
# show up as NaN in any comparison: worth switching on whenever a kernel changes.
OUTPUT_FILL = None


# ----------------------------------------------------------------------------- attention
# q (B, H, Tq, D), k and v (B, G, Tk, D) with H a multiple of G (GQA; G = 1 is MQA).
# When Tq < Tk the queries are the last Tq positions (chunked prefill, decoding with a cache),
# so the causal diagonal is aligned to the end: query row r sits at absolute position Tk - Tq + r.


def attention_ref(q, k, v, causal=True, alibi_slopes=None, scale=None):
    """The formula, step by step: softmax(q k^T * scale + bias + mask) v."""
    B, H, Tq, D = q.shape
    G, Tk = k.size(1), k.size(2)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    kv_head = torch.arange(H, device=q.device) // (H // G)  # which K/V head each query head reads
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


def attention(q, k, v, causal=True, alibi_slopes=None, scale=None, impl=None):
    """Fast path. impl: None picks Triton for CUDA tensors (head dims up to 128, not float64) and
    torch's scaled_dot_product_attention otherwise; "triton" or "torch" forces one (forcing "triton"
    on the CPU needs TRITON_INTERPRET=1)."""
    B, H, Tq, D = q.shape
    G, Tk = k.size(1), k.size(2)
    if H % G:
        raise ValueError(f"n_head={H} must be a multiple of the K/V heads={G}")
    if causal and Tq > Tk:
        raise ValueError(f"causal attention needs Tq={Tq} <= Tk={Tk}: the queries are the last Tq positions")
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    if impl is None:  # float64 stays float64: the kernel computes in float32
        impl = "triton" if q.device.type in TRITON_DEVICES and D <= 128 and q.dtype != torch.float64 else "torch"
    if impl == "triton":
        if q.dtype == torch.float64:
            raise ValueError("the Triton attention kernel computes in float32: use impl='torch' for float64")
        # Like SDPA: follow autocast, and bring k and v (a float32 KV cache, say) to q's dtype.
        dev = q.device.type
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else q.dtype
        q, k, v = (x.to(dtype).contiguous() for x in (q, k, v))
        slopes = None if alibi_slopes is None else alibi_slopes.to(device=q.device, dtype=torch.float32).contiguous()
        return FlashAttention.apply(q, k, v, causal, slopes, scale)
    mask = None
    if alibi_slopes is not None or (causal and Tq != Tk):  # SDPA's own is_causal aligns to the start
        i = torch.arange(Tk - Tq, Tk, device=q.device, dtype=torch.float32)[:, None]  # (Tq, 1), exact below 2^24
        j = torch.arange(Tk, device=q.device, dtype=torch.float32)[None, :]  # (1, Tk)
        mask = torch.zeros(Tq, Tk, device=q.device, dtype=q.dtype)
        if causal:
            mask.masked_fill_(j > i, float("-inf"))
        if alibi_slopes is not None:
            # 4-D, not (H, Tq, Tk): torch's CPU flash kernel takes 2-D and 4-D masks, a 3-D one
            # sends SDPA to its math path, which stores the (B, H, Tq, Tk) scores and probabilities.
            # Built in place: the mask is one (H, Tq, Tk) matrix, the temporaries (Tq, Tk) ones.
            bias = (alibi_slopes.float().view(1, H, 1, 1) * (i - j).abs_()).to(q.dtype)  # (1, H, Tq, Tk)
            mask = bias.neg_().add_(mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None,
                                          scale=scale, enable_gqa=H != G)


# ----------------------------------------------------------------------------- selective scan
# The Mamba (S6) recurrence in the official layout, for every batch b, channel d, state n:
#   dt_t = softplus(delta_t + delta_bias)                       u, delta, z: (B, I, L)
#   h_t  = exp(dt_t A) * h_{t-1} + dt_t B_t u_t                 A: (I, N)   B, C: (B, N, L)
#   y_t  = C_t . h_t + D u_t,   out_t = y_t * silu(z_t)         h: (B, I, N), always float32
# Three paths compute it: selective_scan_ref (a loop over time: the ground truth),
# selective_scan_chunked (plain PyTorch, the CPU path) and a Triton kernel (the CUDA path).
# Legend here: B batch, I channels (d_inner in the model files), N state size, L length,
# P steps per chunk (the chunked path).


def _scan_inputs(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    """Upcast to the accumulation dtype and apply the bias and softplus to the step size."""
    acc = torch.float64 if u.dtype == torch.float64 else torch.float32
    u, delta, A, B, C = (t.to(acc) for t in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias.to(acc)[:, None]  # (B, I, L)
    if delta_softplus:
        delta = F.softplus(delta)  # dt > 0, so exp(dt A) is a decay when A < 0
    D = None if D is None else D.to(acc)
    z = None if z is None else z.to(acc)
    return u, delta, A, B, C, D, z


def _scan_output(y, u, D, z, out_dtype):
    if D is not None:
        y = y + D[:, None] * u  # (B, I, L): the skip connection
    if z is not None:
        y = y * F.silu(z)  # the gate
    return y.to(out_dtype)


def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=True,
                       initial_state=None, return_last_state=False):
    """The recurrence as written, one time step after another. Slow and obviously right."""
    out_dtype = u.dtype
    u, dt, A, B, C, D, z = _scan_inputs(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    Bsz, Dm, L = u.shape
    h = u.new_zeros(Bsz, Dm, A.size(1)) if initial_state is None else initial_state.to(u.dtype)  # (B, I, N)
    ys = []
    # unbind, not [..., t]: the backward of indexing would build a full-size gradient per step
    for dt_t, u_t, B_t, C_t in zip(dt.unbind(-1), u.unbind(-1), B.unbind(-1), C.unbind(-1)):
        decay = torch.exp(dt_t[:, :, None] * A)  # (B, I, N)
        h = decay * h + (dt_t * u_t)[:, :, None] * B_t[:, None, :]  # (B, I, N)
        ys.append((h * C_t[:, None, :]).sum(-1))  # (B, I)
    y = torch.stack(ys, dim=-1) if L else u.new_zeros(Bsz, Dm, 0)  # (B, I, L)
    out = _scan_output(y, u, D, z, out_dtype)
    return (out, h) if return_last_state else out


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=True,
                   initial_state=None, return_last_state=False, impl=None):
    """out (B, I, L) in u's dtype [, last state (B, I, N) float32]. impl: None picks Triton on
    CUDA (float64 excepted: the kernel computes in float32) and the chunked scan elsewhere;
    "ref", "chunked" or "triton" forces a path."""
    if impl is None:
        impl = "triton" if u.device.type in TRITON_DEVICES and u.dtype != torch.float64 else "chunked"
    fn = {"ref": selective_scan_ref, "chunked": selective_scan_chunked, "triton": selective_scan_triton}[impl]
    return fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, return_last_state)


def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=True):
    """One step of the recurrence, for generation: state (B, I, N) float32; x, dt, z (B, I);
    B, C (B, N). Returns (y (B, I) in x's dtype, new state). The state is not modified in place."""
    acc = state.dtype
    dt = dt.to(acc) if dt_bias is None else dt.to(acc) + dt_bias.to(acc)
    if dt_softplus:
        dt = F.softplus(dt)  # (B, I)
    xa = x.to(acc)
    state = torch.exp(dt[:, :, None] * A.to(acc)) * state + (dt * xa)[:, :, None] * B.to(acc)[:, None, :]  # (B, I, N)
    y = (state * C.to(acc)[:, None, :]).sum(-1)  # (B, I)
    if D is not None:
        y = y + D.to(acc) * xa
    if z is not None:
        y = y * F.silu(z.to(acc))
    return y.to(x.dtype), state


def selective_scan_chunked(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=True,
                           initial_state=None, return_last_state=False, chunk_size=8):
    """The CPU fast path: the Triton kernel's algorithm in torch operations, with its own backward.

    Time is cut into chunks of P steps (8: a chunk's (P, B, I, N) tensors then fit in a core's L2
    cache at Mamba's default training shapes; 16 measured 10% slower at d_model 160). Per chunk,
    everything that does not depend on the previous state is computed at once, as (P, B, I, N)
    tensors: the decays exp(dt A) and the inputs dt B x; then one fused multiply-add per time step,
    h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t, and the outputs C_t . h_t of the whole chunk in one
    batched matmul. The forward keeps only the state entering each chunk. The backward takes the
    chunks in reverse: it recomputes a chunk's P states from its start, runs the adjoint recurrence
    dL/dh_{t-1} = exp(dt_t A) dL/dh_t + C_{t-1} dL/dy_{t-1}, again one multiply-add per step, and
    gets every gradient of the chunk from those states and adjoints in a few large operations.
    Memory is O(L/P) states plus a few chunks; every step multiplies by one factor exp(dt A) in
    [0, 1], so strong decay underflows to exactly 0 and nothing is divided.
    It all runs on one intra-op thread: the operations are small (the per-step ones B * D * N
    numbers) and many, and on a shared CPU each of them would otherwise wait for a descheduled
    helper thread (measured: 0.2 s idle, 38 s to over 100 s loaded on two threads).
    """
    out, last = _ChunkedScan.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, chunk_size)
    return (out, last) if return_last_state else out


def _time_major(x, dtype):
    """(B, X, L) -> (L, B, X) contiguous: step t reads one block. The copy follows x's layout: a
    contiguous (B, X, L) goes as one 2-D transpose (B*X, L) -> (L, B*X), which torch does in cache
    blocks; the generic strided copy reads one number per cache line there and is ~6x slower. A
    transposed (B, L, X) (a projection's output) is copied row by row."""
    Bsz, X, L = x.shape
    x = x.to(dtype)
    if x.stride(-1) != 1:
        return x.permute(2, 0, 1).contiguous()
    return x.reshape(Bsz * X, L).t().contiguous().view(L, Bsz, X)


def _batch_major(x, rows):
    """(L, B, X) -> (B, X, L): a (B, L, X) tensor seen transposed if rows (the layout of a projection's
    output, which the caller's next matmul reads as is), else a contiguous (B, X, L). Both copies move
    whole rows or blocks (see _time_major)."""
    L, Bsz, X = x.shape
    if rows:
        return x.permute(1, 0, 2).contiguous().transpose(1, 2)
    return x.reshape(L, Bsz * X).t().contiguous().view(Bsz, X, L)


@contextlib.contextmanager
def _one_thread():
    """torch on one intra-op thread inside, restored after (per process: torch's setting is global)."""
    n = torch.get_num_threads()
    if n > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if n > 1:
            torch.set_num_threads(n)


def _recurrence(h0, decay, x, out):
    """out[k] = decay[k] * out[k-1] + x[k], out[-1] being h0: the state after each step of a chunk.
    decay, x, out (P, B, I, N); out may be x itself."""
    prev = h0
    for k in range(x.size(0)):
        prev = torch.addcmul(x[k], prev, decay[k], out=out[k])
    return prev


class _ChunkedScan(torch.autograd.Function):
    """Inputs in the official layout; inside, everything is time-major, (L, B, I) and (L, B, N), so
    that a chunk of steps is one contiguous block and every elementwise operation reads its operands
    in the same order. Inputs are converted once, gradients and output go back once, each in the
    layout its tensor came in (the output in z's). Accumulation in float32 (float64 for float64 inputs)."""

    @staticmethod
    def forward(ctx, *args):
        with _one_thread():
            return _ChunkedScan._forward(ctx, *args)

    @staticmethod
    def backward(ctx, *grads):
        with _one_thread():
            return _ChunkedScan._backward(ctx, *grads)

    @staticmethod
    def _forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, P):
        acc = torch.float64 if u.dtype == torch.float64 else torch.float32
        Bsz, Dm, L = u.shape
        N = A.size(1)
        n_chunk = -(-L // P)
        u_t, s_t = _time_major(u, acc), _time_major(delta, acc)  # (L, B, I)
        if delta_bias is not None:
            s_t = s_t + delta_bias.to(acc)
        dt_t = F.softplus(s_t) if delta_softplus else s_t
        du_t = dt_t * u_t  # (L, B, I)
        A_ = A.to(acc)
        B_t, C_t = _time_major(B, acc), _time_major(C, acc)  # (L, B, N)
        h = u.new_zeros(Bsz, Dm, N, dtype=acc) if initial_state is None else initial_state.to(acc)  # (B, I, N)
        starts = u.new_empty(n_chunk, Bsz, Dm, N, dtype=acc)  # the state entering each chunk
        y_t = u.new_empty(L, Bsz, Dm, dtype=acc)  # (L, B, I)
        for c in range(n_chunk):
            t0, t1 = c * P, min(c * P + P, L)
            starts[c] = h
            decay = torch.exp(dt_t[t0:t1, :, :, None] * A_)  # (P, B, I, N), in [0, 1] when A <= 0
            hs = du_t[t0:t1, :, :, None] * B_t[t0:t1, :, None, :]  # (P, B, I, N): dt B x, then the states
            h = _recurrence(h, decay, hs, hs)
            torch.bmm(hs.view(-1, Dm, N), C_t[t0:t1].reshape(-1, N, 1),
                      out=y_t[t0:t1].view(-1, Dm, 1))  # (P*B, I, 1): C_t . h_t
        out_t = y_t + D.to(acc) * u_t if D is not None else y_t  # (L, B, I)
        z_t = _time_major(z, acc) if z is not None else None
        if z is not None:
            out_t = out_t * F.silu(z_t)
        ctx.save_for_backward(u_t, s_t, A, B_t, C_t, D, z_t, delta_bias, initial_state, starts, y_t)
        ctx.softplus, ctx.P, ctx.delta_dtype = delta_softplus, P, delta.dtype
        ctx.dtypes = (u.dtype, B.dtype, C.dtype, None if z is None else z.dtype)
        ctx.rows = tuple(x is not None and x.stride(-1) != 1 for x in (u, delta, B, C, z))
        out = _batch_major(out_t, rows=ctx.rows[4] if z is not None else ctx.rows[0])
        return out.to(u.dtype), h.clone()  # h is a view into the last chunk (or the input itself when L = 0)

    @staticmethod
    def _backward(ctx, dout, dlast):
        u_t, s_t, A, B_t, C_t, D, z_t, delta_bias, initial_state, starts, y_t = ctx.saved_tensors
        P = ctx.P
        acc = s_t.dtype
        L, Bsz, Dm = u_t.shape
        N = A.size(1)
        u_dtype, B_dtype, C_dtype, z_dtype = ctx.dtypes
        u_rows, delta_rows, B_rows, C_rows, z_rows = ctx.rows
        dt_t = F.softplus(s_t) if ctx.softplus else s_t  # (L, B, I)
        A_, dy_t = A.to(acc), _time_major(dout, acc)  # dy_t: dL/dout, then dL/dy
        dz = None
        if z_t is not None:
            sig = torch.sigmoid(z_t)
            y_skip = y_t + D.to(acc) * u_t if D is not None else y_t  # the output before the gate
            dz = _batch_major(dy_t * y_skip * sig * (1 + z_t * (1 - sig)), z_rows).to(z_dtype)
            dy_t = dy_t * z_t * sig  # dL/dy
        dD = (dy_t * u_t).sum((0, 1)).to(D.dtype) if D is not None else None
        du_t = dt_t * u_t  # (L, B, I)
        # dL/dh at the end of the current chunk from the steps after it (the last state's gradient first)
        g_next = dlast.to(acc) if dlast is not None else u_t.new_zeros(Bsz, Dm, N, dtype=acc)  # (B, I, N)
        dA = torch.zeros_like(A_)  # (I, N)
        dB_t, dC_t = u_t.new_empty(L, Bsz, 1, N, dtype=acc), u_t.new_empty(L, Bsz, 1, N, dtype=acc)
        ddu_t, ddt_t = u_t.new_empty(L, Bsz, Dm, 1, dtype=acc), u_t.new_empty(L, Bsz, Dm, dtype=acc)
        hs = u_t.new_empty(P + 1, Bsz, Dm, N, dtype=acc)  # one chunk of states h_{t0-1} .. h_{t1-1}, recomputed
        for c in reversed(range(-(-L // P))):
            t0, t1 = c * P, min(c * P + P, L)
            n = t1 - t0
            decay = torch.exp(dt_t[t0:t1, :, :, None] * A_)  # (n, B, I, N)
            hs[0] = starts[c]
            torch.mul(du_t[t0:t1, :, :, None], B_t[t0:t1, :, None, :], out=hs[1:n + 1])
            _recurrence(hs[0], decay, hs[1:n + 1], hs[1:n + 1])
            # the adjoint recurrence, backwards in time: g_t = exp(dt_{t+1} A) g_{t+1} + C_t dL/dy_t
            g = dy_t[t0:t1, :, :, None] * C_t[t0:t1, :, None, :]  # (n, B, I, N): C_t dL/dy_t, then g_t
            g[-1] += g_next
            for k in range(n - 2, -1, -1):
                g[k].addcmul_(g[k + 1], decay[k + 1])
            g_next = g[0] * decay[0]
            h_f, g_f = hs[1:n + 1].view(-1, Dm, N), g.view(-1, Dm, N)  # (n*B, I, N)
            torch.bmm(dy_t[t0:t1].view(-1, 1, Dm), h_f, out=dC_t[t0:t1].view(-1, 1, N))  # sum over I
            torch.bmm(g_f, B_t[t0:t1].reshape(-1, N, 1), out=ddu_t[t0:t1].view(-1, Dm, 1))  # dL/d(dt u)
            torch.bmm(du_t[t0:t1].view(-1, 1, Dm), g_f, out=dB_t[t0:t1].view(-1, 1, N))
            g_log = decay.mul_(g).mul_(hs[:n])  # dL/d(dt A), elementwise (n, B, I, N)
            ddt_t[t0:t1] = torch.einsum("kbin,in->kbi", g_log, A_)  # a matmul per channel: no (n, B, I, N) product
            dA += g_log.mul_(dt_t[t0:t1, :, :, None]).sum((0, 1))
        ddu_t = ddu_t[..., 0]  # (L, B, I)
        ddt_t += ddu_t * u_t
        du_t = ddu_t * dt_t + dy_t * D.to(acc) if D is not None else ddu_t * dt_t
        ds_t = ddt_t * torch.sigmoid(s_t) if ctx.softplus else ddt_t
        dbias = ds_t.sum((0, 1)).to(delta_bias.dtype) if delta_bias is not None else None
        dh0 = g_next.to(initial_state.dtype) if initial_state is not None else None
        return (_batch_major(du_t, u_rows).to(u_dtype), _batch_major(ds_t, delta_rows).to(ctx.delta_dtype),
                dA.to(A.dtype), _batch_major(dB_t[:, :, 0], B_rows).to(B_dtype),
                _batch_major(dC_t[:, :, 0], C_rows).to(C_dtype), dD, dz, dbias, None, dh0, None)


# ----------------------------------------------------------------------------- Triton machinery


try:
    import triton
    import triton.language as tl
except ImportError:  # no Triton on this platform (macOS, Windows): only the torch paths run
    class _NoTriton:
        jit = staticmethod(lambda fn: fn)
        constexpr = staticmethod(lambda value: value)
    triton = tl = _NoTriton()

LOG2E = tl.constexpr(1.4426950408889634)  # log2(e): the kernels keep exponents in base 2, exp2 is the fast instruction


# TRITON_INTERPRET=1 runs the kernels on the CPU with numpy (how the tests run them); it must be
# set before this module is imported. numpy has no bfloat16 arithmetic, so there bf16 tiles are
# upcast to float32 right after loading.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on", "y")


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
# the K/V head of query head bh is then simply bh // (H // G): GQA by index, no copies.
# The grid is one axis of B * H * tiles programs, program p taking tile p % tiles of head
# p // tiles: the tiles of one head are neighbours, so they run together and share its K and V
# in L2 (the order of a (tiles, B * H) grid), and B * H is not held to the 65535 blocks that
# CUDA allows along grid axes 1 and 2.


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
    n_tiles = tl.cdiv(Tq, BLOCK_M)
    pid = tl.program_id(0)
    m0 = (n_tiles - 1 - pid % n_tiles) * BLOCK_M  # the longest causal rows start first
    bh = (pid // n_tiles).to(tl.int64)  # b * H + h
    Q += bh * Tq * D
    O += bh * Tq * D
    K += (bh // GROUP) * Tk * D  # the shared K/V head
    V += (bh // GROUP) * Tk * D
    rows = m0 + tl.arange(0, BLOCK_M)
    pos_q = Tk - Tq + rows  # absolute positions of the queries
    qk_scale = scale * LOG2E
    slope = 0.0
    if ALIBI:
        slope = tl.load(SLOPES + bh % H) * LOG2E
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
    n_tiles = tl.cdiv(Tq, BLOCK_M)
    bh = (tl.program_id(0) // n_tiles).to(tl.int64)
    rows = tl.program_id(0) % n_tiles * BLOCK_M + tl.arange(0, BLOCK_M)
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
        lse = tl.load(LSE + rows, mask=rows < Tq, other=0.0) * LOG2E
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
    n_tiles = tl.cdiv(Tk, BLOCK_N)
    n0 = tl.program_id(0) % n_tiles * BLOCK_N
    bhk = (tl.program_id(0) // n_tiles).to(tl.int64)  # b * G + hk
    K += bhk * Tk * D
    V += bhk * Tk * D
    pos_k = n0 + tl.arange(0, BLOCK_N)
    k = _load_tile(K, pos_k, Tk, D, BLOCK_D, UPCAST)  # (BLOCK_N, BLOCK_D)
    v = _load_tile(V, pos_k, Tk, D, BLOCK_D, UPCAST)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    qk_scale = scale * LOG2E
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
            slope = tl.load(SLOPES + bh % H) * LOG2E
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
    n_tiles = tl.cdiv(Tq, BLOCK_M)
    pid = tl.program_id(0)
    m0 = (n_tiles - 1 - pid % n_tiles) * BLOCK_M  # the longest causal rows start first
    bh = (pid // n_tiles).to(tl.int64)
    K += (bh // GROUP) * Tk * D
    V += (bh // GROUP) * Tk * D
    rows = m0 + tl.arange(0, BLOCK_M)
    pos_q = Tk - Tq + rows
    qk_scale = scale * LOG2E
    slope = 0.0
    if ALIBI:
        slope = tl.load(SLOPES + bh % H) * LOG2E
    q = _load_tile(Q + bh * Tq * D, rows, Tq, D, BLOCK_D, UPCAST)  # (BLOCK_M, BLOCK_D)
    do = _load_tile(DO + bh * Tq * D, rows, Tq, D, BLOCK_D, UPCAST)
    # Rows past Tq read lse = 0 and zero q, do: finite garbage in rows that are never stored.
    lse = tl.load(LSE + bh * Tq + rows, mask=rows < Tq, other=0.0) * LOG2E
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
# The environment variable KERNEL_CONFIG replaces them, for a sweep on a GPU, e.g.
#   KERNEL_CONFIG="fwd=128,64,8,3 dq=64,32,4,2 scan=16,32,4"
# fwd, dkdv and dq take BLOCK_M,BLOCK_N,num_warps,num_stages; scan takes block_d,ckpt,num_warps
# (the forward and backward scan kernels). It is read at every launch.
CONFIG_FIELDS = {"fwd": 4, "dkdv": 4, "dq": 4, "scan": 3}


def _config_override(kernel):
    """KERNEL_CONFIG's settings for kernel, or None; a malformed KERNEL_CONFIG is a ValueError."""
    spec = os.environ.get("KERNEL_CONFIG", "")
    found = None
    for item in spec.replace(";", " ").split():
        name, _, values = item.partition("=")
        try:
            numbers = tuple(int(x) for x in values.split(","))
        except ValueError:
            numbers = ()
        ok = name in CONFIG_FIELDS and len(numbers) == CONFIG_FIELDS[name] and min(numbers) >= 1
        if ok:  # tile sizes (tl.arange) and warps are powers of two; tl.dot wants tiles of 16 or more
            tiles, smallest = (numbers[:1], 1) if name == "scan" else (numbers[:2], 16)
            ok = all(x >= smallest and x & (x - 1) == 0 for x in tiles) and numbers[2] & (numbers[2] - 1) == 0
        if not ok:
            raise ValueError(f"KERNEL_CONFIG entry {item!r}: expected one of "
                             f"{', '.join(f'{k}=' + ','.join(['N'] * n) for k, n in CONFIG_FIELDS.items())} "
                             "with tile sizes and warps powers of two (tiles >= 16 for attention)")
        if name == kernel:
            found = numbers
    return found


def _config(kernel, D, dtype):
    override = _config_override(kernel)
    if override:
        return override
    # Each choice compiles for sm_90 without spilling registers (python -m lab.gpu_compile).
    if dtype == torch.float32:  # exact fp32 dots run on the FMA units: only small tiles fit the registers
        return (16, 16, 4, 2) if D > 64 else (32, 16, 4, 2)  # (16 x 16 at D=64 used local memory, Triton 3.6)
    if kernel == "fwd":  # (4 warps at D=64 reached 255 registers and spilled with ALiBi)
        return 128, 64, 8, 3
    return 64, 64, 8 if D > 64 else 4, 2  # dkdv and dq: two fp32 accumulators (dk, dv) per program


def _scan_config(Dm, N, L):
    """(block_d, ckpt, num_warps) of the scan kernels: KERNEL_CONFIG's scan=..., else the default."""
    # block_d * N states per program: 32 x 16 at Mamba's N = 16; at N = 64, 8 channels (32 spilled)
    block_d = min(32, max(1, 512 // triton.next_power_of_2(N)), triton.next_power_of_2(Dm))
    return _config_override("scan") or (block_d, min(64, triton.next_power_of_2(max(L, 1))), 4)


def _new_output(shape, dtype, device):
    if OUTPUT_FILL is None:
        return torch.empty(shape, dtype=dtype, device=device)
    return torch.full(shape, OUTPUT_FILL, dtype=dtype, device=device)


def _kernel_flags(q, D):
    return dict(D=D, BLOCK_D=max(16, triton.next_power_of_2(D)),
                UPCAST=INTERPRET and q.dtype == torch.bfloat16,
                PRECISION="ieee" if q.dtype == torch.float32 else "tf32")  # fp32 stays fp32 (no TF32)


def _flash_forward(q, k, v, causal, slopes, scale):
    """q, k, v contiguous; returns o (B, H, Tq, D) and the row log-sum-exp lse (B, H, Tq) in float32."""
    B, H, Tq, D = q.shape
    G, Tk = k.size(1), k.size(2)
    o = _new_output(q.shape, q.dtype, q.device)
    lse = _new_output((B, H, Tq), torch.float32, q.device)
    BM, BN, warps, stages = _config("fwd", D, q.dtype)
    _flash_fwd_kernel[(triton.cdiv(Tq, BM) * B * H,)](
        q, k, v, o, lse, q if slopes is None else slopes, scale, Tq, Tk, H, H // G,
        CAUSAL=causal, ALIBI=slopes is not None, BLOCK_M=BM, BLOCK_N=BN, **_kernel_flags(q, D),
        num_warps=warps, num_stages=stages)
    return o, lse


def _flash_backward(q, k, v, o, lse, do, causal, slopes, scale):
    B, H, Tq, D = q.shape
    G, Tk = k.size(1), k.size(2)
    flags = _kernel_flags(q, D)
    delta = _new_output((B, H, Tq), torch.float32, q.device)
    _flash_bwd_pre_kernel[(triton.cdiv(Tq, 64) * B * H,)](o, do, delta, Tq, D=D, BLOCK_M=64, BLOCK_D=flags["BLOCK_D"])
    dq, dk, dv = (_new_output(x.shape, x.dtype, x.device) for x in (q, k, v))
    slopes_ptr = q if slopes is None else slopes
    BM, BN, warps, stages = _config("dkdv", D, q.dtype)
    _flash_bwd_dkdv_kernel[(triton.cdiv(Tk, BN) * B * G,)](
        q, k, v, do, lse, delta, dk, dv, slopes_ptr, scale, Tq, Tk, H, H // G,
        CAUSAL=causal, ALIBI=slopes is not None, BLOCK_M=BM, BLOCK_N=BN, **flags, num_warps=warps, num_stages=stages)
    BM, BN, warps, stages = _config("dq", D, q.dtype)
    _flash_bwd_dq_kernel[(triton.cdiv(Tq, BM) * B * H,)](
        q, k, v, do, lse, delta, dq, slopes_ptr, scale, Tq, Tk, H, H // G,
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


# The Triton kernel. One program owns one sequence b and BLOCK_D channels, keeps their state
# (BLOCK_D, N) in registers and walks along time; softplus, bias, D and the z gate happen on
# the way, so each input is read once and the output written once. The forward also writes
# the state every CKPT steps; the backward walks time in reverse, one CKPT-long segment at a
# time: it recomputes the segment's states from its checkpoint into a small scratch buffer,
# then runs the adjoint recurrence g_{t-1} = exp(dt_t A) g_t + (dL/dh_{t-1} from y_{t-1}).
# dB and dC sum over channels, which other programs own: each program writes its partial sum
# and torch adds them up in a fixed order (no atomics, so the result is deterministic).
# Steps past L are identities (dt = 0) and padded states (n >= N) stay 0 (A = B = C = 0).


@triton.jit
def _scan_step_inputs(u_ptr, dt_ptr, bias, B_ptr, row, bcol, t, mt, mnt,
                      HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    u = tl.load(u_ptr + row + t, mask=mt, other=0.0).to(tl.float32)  # (BLOCK_D,)
    dt_raw = tl.load(dt_ptr + row + t, mask=mt, other=0.0).to(tl.float32)  # (BLOCK_D,)
    if HAS_BIAS:
        dt_raw += bias
    dt = dt_raw
    if SOFTPLUS:
        dt = tl.where(dt_raw <= 20.0, tl.log(1.0 + tl.exp(dt_raw)), dt_raw)  # as F.softplus
    dt = tl.where(mt, dt, 0.0)  # past the end: an identity step
    Bt = tl.load(B_ptr + bcol + t, mask=mnt, other=0.0).to(tl.float32)  # (BLOCK_N,)
    return u, dt_raw, dt, Bt


@triton.jit
def _scan_fwd_kernel(u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, h0_ptr,
                     out_ptr, hlast_ptr, ckpt_ptr, Dm, L, N, n_ckpt,
                     HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
                     HAS_H0: tl.constexpr, SOFTPLUS: tl.constexpr, SAVE_CKPT: tl.constexpr,
                     BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, CKPT: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)  # offsets past 2^31 elements at large B * D * L
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)  # (BLOCK_D,)
    n = tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    md, mn = d < Dm, n < N
    mdn = md[:, None] & mn[None, :]  # (BLOCK_D, BLOCK_N)
    A = tl.load(A_ptr + d[:, None] * N + n[None, :], mask=mdn, other=0.0).to(tl.float32) * LOG2E
    Dp = tl.load(D_ptr + d, mask=md, other=0.0).to(tl.float32) if HAS_D else 0.0
    bias = tl.load(bias_ptr + d, mask=md, other=0.0).to(tl.float32) if HAS_BIAS else 0.0
    state_off = (b * Dm + d[:, None]) * N + n[None, :]  # (BLOCK_D, BLOCK_N) into (B, I, N)
    if HAS_H0:
        h = tl.load(h0_ptr + state_off, mask=mdn, other=0.0).to(tl.float32)
    else:
        h = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    row = (b * Dm + d) * L  # (BLOCK_D,) start of each channel's time series
    bcol = (b * N + n) * L  # (BLOCK_N,)
    for c in range(n_ckpt):
        if SAVE_CKPT:  # only the backward reads them
            tl.store(ckpt_ptr + ((b * n_ckpt + c) * Dm + d[:, None]) * BLOCK_N + n[None, :], h, mask=md[:, None])
        for k in range(CKPT):
            t = c * CKPT + k
            in_range = (tl.zeros((1,), dtype=tl.int32) + t) < L  # a tensor: the interpreter wants one
            mt, mnt = md & in_range, mn & in_range
            u, dt_raw, dt, Bt = _scan_step_inputs(u_ptr, dt_ptr, bias, B_ptr, row, bcol, t, mt, mnt,
                                                  HAS_BIAS, SOFTPLUS)
            Ct = tl.load(C_ptr + bcol + t, mask=mnt, other=0.0).to(tl.float32)  # (BLOCK_N,)
            h = tl.exp2(dt[:, None] * A) * h + (dt * u)[:, None] * Bt[None, :]  # (BLOCK_D, BLOCK_N)
            y = tl.sum(h * Ct[None, :], axis=1)  # (BLOCK_D,)
            if HAS_D:
                y += Dp * u
            if HAS_Z:
                zt = tl.load(z_ptr + row + t, mask=mt, other=0.0).to(tl.float32)
                y = y * zt * tl.sigmoid(zt)
            tl.store(out_ptr + row + t, y.to(out_ptr.dtype.element_ty), mask=mt)
    tl.store(hlast_ptr + state_off, h, mask=mdn)


@triton.jit
def _scan_bwd_kernel(u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, ckpt_ptr,
                     dout_ptr, dhlast_ptr, work_ptr,
                     du_ptr, ddt_ptr, dz_ptr, dA_ptr, dD_ptr, dbias_ptr, dB_ptr, dC_ptr, dh0_ptr,
                     Dm, L, N, n_ckpt,
                     HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
                     SOFTPLUS: tl.constexpr,
                     BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, CKPT: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)  # offsets past 2^31 elements at large B * D * L
    pid_d = tl.program_id(1)
    n_dblk = tl.num_programs(1)
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)  # (BLOCK_D,)
    n = tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    md, mn = d < Dm, n < N
    mdn = md[:, None] & mn[None, :]  # (BLOCK_D, BLOCK_N)
    A = tl.load(A_ptr + d[:, None] * N + n[None, :], mask=mdn, other=0.0).to(tl.float32)  # (BLOCK_D, BLOCK_N)
    A2 = A * LOG2E
    Dp = tl.load(D_ptr + d, mask=md, other=0.0).to(tl.float32) if HAS_D else 0.0
    bias = tl.load(bias_ptr + d, mask=md, other=0.0).to(tl.float32) if HAS_BIAS else 0.0
    state_off = (b * Dm + d[:, None]) * N + n[None, :]  # (BLOCK_D, BLOCK_N)
    g = tl.load(dhlast_ptr + state_off, mask=mdn, other=0.0)  # dL/dh_L: from the last state, if used
    dA_acc = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    dD_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    dbias_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    row = (b * Dm + d) * L  # (BLOCK_D,)
    bcol = (b * N + n) * L  # (BLOCK_N,)
    part = (b * n_dblk + pid_d) * L * N + n  # (BLOCK_N,) into the (B, n_dblk, L, N) partials: N contiguous per step
    work_off = (b * CKPT * Dm + d[:, None]) * BLOCK_N + n[None, :]  # (BLOCK_D, BLOCK_N), + k * Dm * BLOCK_N
    for ci in range(n_ckpt):
        c = n_ckpt - 1 - ci
        # recompute this segment's states h_{t-1} into the scratch buffer
        h = tl.load(ckpt_ptr + ((b * n_ckpt + c) * Dm + d[:, None]) * BLOCK_N + n[None, :], mask=md[:, None], other=0.0)
        for k in range(CKPT):
            t = c * CKPT + k
            in_range = (tl.zeros((1,), dtype=tl.int32) + t) < L
            mt, mnt = md & in_range, mn & in_range
            u, dt_raw, dt, Bt = _scan_step_inputs(u_ptr, dt_ptr, bias, B_ptr, row, bcol, t, mt, mnt,
                                                  HAS_BIAS, SOFTPLUS)
            tl.store(work_ptr + work_off + k * Dm * BLOCK_N, h, mask=md[:, None])
            h = tl.exp2(dt[:, None] * A2) * h + (dt * u)[:, None] * Bt[None, :]
        tl.debug_barrier()
        # walk the segment backwards
        for kk in range(CKPT):
            k = CKPT - 1 - kk
            t = c * CKPT + k
            in_range = (tl.zeros((1,), dtype=tl.int32) + t) < L
            mt, mnt = md & in_range, mn & in_range
            u, dt_raw, dt, Bt = _scan_step_inputs(u_ptr, dt_ptr, bias, B_ptr, row, bcol, t, mt, mnt,
                                                  HAS_BIAS, SOFTPLUS)
            Ct = tl.load(C_ptr + bcol + t, mask=mnt, other=0.0).to(tl.float32)  # (BLOCK_N,)
            dy = tl.load(dout_ptr + row + t, mask=mt, other=0.0).to(tl.float32)  # (BLOCK_D,)
            h_prev = tl.load(work_ptr + work_off + k * Dm * BLOCK_N, mask=md[:, None], other=0.0)
            decay = tl.exp2(dt[:, None] * A2)  # (BLOCK_D, BLOCK_N)
            h = decay * h_prev + (dt * u)[:, None] * Bt[None, :]
            if HAS_Z:
                y = tl.sum(h * Ct[None, :], axis=1)
                if HAS_D:
                    y += Dp * u
                zt = tl.load(z_ptr + row + t, mask=mt, other=0.0).to(tl.float32)
                sig = tl.sigmoid(zt)
                tl.store(dz_ptr + row + t, (dy * y * sig * (1.0 + zt * (1.0 - sig))).to(dz_ptr.dtype.element_ty), mask=mt)
                dy = dy * zt * sig  # through the gate
            du = tl.zeros((BLOCK_D,), dtype=tl.float32)
            if HAS_D:
                dD_acc += dy * u
                du = dy * Dp
            tl.store(dC_ptr + part + t * N, tl.sum(dy[:, None] * h, axis=0), mask=mnt)
            g = g + dy[:, None] * Ct[None, :]  # dL/dh_t, complete now
            gB = tl.sum(g * Bt[None, :], axis=1)  # (BLOCK_D,) dL/d(dt u)
            tl.store(dB_ptr + part + t * N, tl.sum(g * (dt * u)[:, None], axis=0), mask=mnt)
            g_log = g * decay * h_prev  # dL/d(dt A), elementwise
            dA_acc += g_log * dt[:, None]
            ddt = gB * u + tl.sum(g_log * A, axis=1)  # (BLOCK_D,)
            if SOFTPLUS:
                ddt = ddt * tl.sigmoid(dt_raw)
            ddt = tl.where(mt, ddt, 0.0)
            if HAS_BIAS:
                dbias_acc += ddt
            tl.store(du_ptr + row + t, (du + gB * dt).to(du_ptr.dtype.element_ty), mask=mt)
            tl.store(ddt_ptr + row + t, ddt.to(ddt_ptr.dtype.element_ty), mask=mt)
            g = g * decay  # dL/dh_{t-1} through the recurrence
        tl.debug_barrier()  # the next segment reuses the scratch buffer
    tl.store(dh0_ptr + state_off, g, mask=mdn)
    tl.store(dA_ptr + state_off, dA_acc, mask=mdn)
    tl.store(dD_ptr + b * Dm + d, dD_acc, mask=md)
    tl.store(dbias_ptr + b * Dm + d, dbias_acc, mask=md)


def _scan_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, block_d, ckpt, warps, save_ckpt):
    """Runs the forward kernel on contiguous inputs; returns out, the last state and, with
    save_ckpt, the (B, n_ckpt, D, BLOCK_N) states every ckpt steps that the backward restarts from."""
    Bsz, Dm, L = u.shape
    N = A.size(1)
    BLOCK_N = triton.next_power_of_2(N)
    n_ckpt = max(1, triton.cdiv(L, ckpt))
    out = _new_output(u.shape, u.dtype, u.device)
    hlast = _new_output((Bsz, Dm, N), torch.float32, u.device)
    ckpts = _new_output((Bsz, n_ckpt, Dm, BLOCK_N), torch.float32, u.device) if save_ckpt else None
    h0 = initial_state.float().contiguous() if initial_state is not None else None
    grid = (Bsz, triton.cdiv(Dm, block_d))
    _scan_fwd_kernel[grid](u, delta, A, B, C, D if D is not None else u, z if z is not None else u,
                           delta_bias if delta_bias is not None else u, h0 if h0 is not None else u,
                           out, hlast, ckpts if save_ckpt else u, Dm, L, N, n_ckpt,
                           HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
                           HAS_H0=h0 is not None, SOFTPLUS=delta_softplus, SAVE_CKPT=save_ckpt,
                           BLOCK_D=block_d, BLOCK_N=BLOCK_N, CKPT=ckpt, num_warps=warps)
    return out, hlast, ckpts


class _SelectiveScanTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, block_d, ckpt, warps):
        out, hlast, ckpts = _scan_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state,
                                          block_d, ckpt, warps, save_ckpt=True)
        N = A.size(1)
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, ckpts)
        ctx.flags = (delta_softplus, initial_state is not None, block_d, ckpt, warps, triton.next_power_of_2(N), ckpts.size(1))
        ctx.initial_dtype = initial_state.dtype if initial_state is not None else None
        return out, hlast

    @staticmethod
    def backward(ctx, dout, dhlast):
        u, delta, A, B, C, D, z, delta_bias, ckpts = ctx.saved_tensors
        softplus, has_h0, block_d, ckpt, warps, BLOCK_N, n_ckpt = ctx.flags
        Bsz, Dm, L = u.shape
        N = A.size(1)
        n_dblk = triton.cdiv(Dm, block_d)
        f32 = lambda *shape: _new_output(shape, torch.float32, u.device)
        du, ddelta = _new_output(u.shape, u.dtype, u.device), _new_output(delta.shape, delta.dtype, u.device)
        dz = _new_output(z.shape, z.dtype, u.device) if z is not None else None
        dA = f32(Bsz, Dm, N)  # per sequence; summed below
        dD, dbias = f32(Bsz, Dm), f32(Bsz, Dm)
        dB, dC = f32(Bsz, n_dblk, L, N), f32(Bsz, n_dblk, L, N)  # every entry written
        dh0 = f32(Bsz, Dm, N)
        # The scratch buffer: the states of one checkpoint interval, recomputed. Every step's state goes
        # through it twice, so at B=32 D=1024 it moves gigabytes, cheaply only while the running
        # programs' share of it stays in L2 (results/gpu_compile.md gives the bytes of each setting).
        work = f32(Bsz, ckpt, Dm, BLOCK_N)
        dhlast = torch.zeros(Bsz, Dm, N, device=u.device, dtype=torch.float32) if dhlast is None else dhlast.float().contiguous()
        _scan_bwd_kernel[(Bsz, n_dblk)](u, delta, A, B, C, D if D is not None else u, z if z is not None else u,
                                        delta_bias if delta_bias is not None else u, ckpts,
                                        dout.contiguous(), dhlast, work,
                                        du, ddelta, dz if dz is not None else du, dA, dD, dbias, dB, dC, dh0,
                                        Dm, L, N, n_ckpt,
                                        HAS_D=D is not None, HAS_Z=z is not None,
                                        HAS_BIAS=delta_bias is not None, SOFTPLUS=softplus,
                                        BLOCK_D=block_d, BLOCK_N=BLOCK_N, CKPT=ckpt, num_warps=warps)
        grads = [du, ddelta, dA.sum(0).to(A.dtype), dB.sum(1).transpose(1, 2).to(B.dtype), dC.sum(1).transpose(1, 2).to(C.dtype),
                 dD.sum(0).to(D.dtype) if D is not None else None, dz,
                 dbias.sum(0).to(delta_bias.dtype) if delta_bias is not None else None, None,
                 dh0.to(ctx.initial_dtype) if has_h0 else None, None, None, None]
        return tuple(grads)


def selective_scan_triton(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=True,
                          initial_state=None, return_last_state=False, block_d=None, ckpt=None, num_warps=None):
    """block_d channels per program, a checkpoint every ckpt steps, num_warps per program: each
    None takes _scan_config's choice (KERNEL_CONFIG's scan=..., else the default)."""
    Dm, L = u.shape[1], u.shape[2]
    if u.dtype == torch.float64:
        raise ValueError("the Triton scan computes in float32: use impl='ref' or 'chunked' for float64")
    default = _scan_config(Dm, A.size(1), L)
    block_d, ckpt, num_warps = block_d or default[0], ckpt or default[1], num_warps or default[2]
    u, delta, A, B, C = (t.contiguous() for t in (u, delta, A, B, C))
    z = z.contiguous() if z is not None else None
    inputs = (u, delta, A, B, C, D, z, delta_bias, initial_state)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs):
        out, last = _SelectiveScanTriton.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state,
                                               block_d, ckpt, num_warps)
    else:  # inference: no autograd node, and no checkpoints written for a backward that never comes
        out, last, _ = _scan_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state,
                                     block_d, ckpt, num_warps, save_ckpt=False)
    return (out, last) if return_last_state else out
