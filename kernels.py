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
# so the causal diagonal is aligned to the end.


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


def attention(q, k, v, causal=True, alibi_slopes=None, scale=None):
    """Fast path. For now torch's scaled_dot_product_attention; the Triton kernel replaces it on CUDA."""
    B, H, Tq, D = q.shape
    Hkv, Tk = k.size(1), k.size(2)
    mask = None
    if alibi_slopes is not None or (causal and Tq != Tk):
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
# The Mamba (S6) recurrence in the official layout, for every batch b, channel d, state n:
#   dt_t = softplus(delta_t + delta_bias)                       u, delta, z: (B, D, L)
#   h_t  = exp(dt_t A) * h_{t-1} + dt_t B_t u_t                 A: (D, N)   B, C: (B, N, L)
#   y_t  = C_t . h_t + D u_t,   out_t = y_t * silu(z_t)         h: (B, D, N), always float32
# Three paths compute it: selective_scan_ref (a loop over time: the ground truth),
# selective_scan_chunked (plain PyTorch, the CPU path) and a Triton kernel (the CUDA path).
# Legend here: B batch, D channels, N state size, L length, T chunk length, K chunks.
try:
    import triton
    import triton.language as tl
except ImportError:  # macOS / Windows: the PyTorch paths still work
    triton = None


def _scan_inputs(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    """Upcast to the accumulation dtype and apply the bias and softplus to the step size."""
    acc = torch.float64 if u.dtype == torch.float64 else torch.float32
    u, delta, A, B, C = (t.to(acc) for t in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias.to(acc)[:, None]  # (B, D, L)
    if delta_softplus:
        delta = F.softplus(delta)  # dt > 0, so exp(dt A) is a decay when A < 0
    D = None if D is None else D.to(acc)
    z = None if z is None else z.to(acc)
    return u, delta, A, B, C, D, z


def _scan_output(y, u, D, z, out_dtype):
    if D is not None:
        y = y + D[:, None] * u  # (B, D, L): the skip connection
    if z is not None:
        y = y * F.silu(z)  # the gate
    return y.to(out_dtype)


def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=True,
                       initial_state=None, return_last_state=False):
    """The recurrence as written, one time step after another. Slow and obviously right."""
    out_dtype = u.dtype
    u, dt, A, B, C, D, z = _scan_inputs(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    Bsz, Dm, L = u.shape
    h = u.new_zeros(Bsz, Dm, A.size(1)) if initial_state is None else initial_state.to(u.dtype)  # (B, D, N)
    ys = []
    # unbind, not [..., t]: the backward of indexing would build a full-size gradient per step
    for dt_t, u_t, B_t, C_t in zip(dt.unbind(-1), u.unbind(-1), B.unbind(-1), C.unbind(-1)):
        decay = torch.exp(dt_t[:, :, None] * A)  # (B, D, N)
        h = decay * h + (dt_t * u_t)[:, :, None] * B_t[:, None, :]  # (B, D, N)
        ys.append((h * C_t[:, None, :]).sum(-1))  # (B, D)
    y = torch.stack(ys, dim=-1) if L else u.new_zeros(Bsz, Dm, 0)  # (B, D, L)
    out = _scan_output(y, u, D, z, out_dtype)
    return (out, h) if return_last_state else out


def selective_scan_chunked(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=True,
                           initial_state=None, return_last_state=False, chunk_size=None):
    """The CPU fast path: split time into K chunks of T steps and scan at two levels.

    1. Inside every chunk, from a zero state, all K chunks advance together: T steps over
       (B, D, N, K) tensors instead of L steps over (B, D, N). Alongside runs the decay from the
       chunk start, a running product of factors exp(dt A) in [0, 1] (the exp of a cumulative
       sum of log-decays): strong decay underflows it to 0, it never overflows, and nothing
       is ever divided by it.
    2. Across chunks, the state entering each chunk is carried: K steps over (B, D, N).
    3. Every position adds the carried state times its decay from the chunk start.
    Work is linear in L, Python runs 2 sqrt(L) steps, and autograd differentiates it.
    """
    out_dtype = u.dtype
    u, dt, A, B, C, D, z = _scan_inputs(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    Bsz, Dm, L = u.shape
    N = A.size(1)
    T = chunk_size or max(8, min(64, 1 << math.ceil(math.log2(math.sqrt(max(L, 1))))))
    T = min(T, max(L, 1))
    K = -(-L // T)  # chunks; the tail of the last chunk is padded with dt = 0 (an identity step)
    pad = K * T - L

    def time_major(x):  # (B, X, L) -> (T, B, X, K), contiguous so that every step reads one block
        return F.pad(x, (0, pad)).view(x.size(0), x.size(1), K, T).permute(3, 0, 1, 2).contiguous()

    dt_c, du_c, B_c, C_c = time_major(dt), time_major(dt * u), time_major(B), time_major(C)
    A_k = A[:, :, None]  # (D, N, 1)

    # 1. local scans from a zero state, all chunks at once (unbind, not [t]: indexing would
    #    make autograd build a full-size gradient per step, quadratic in L)
    h = u.new_zeros(Bsz, Dm, N, K)  # (B, D, N, K)
    decay_from_start = None
    local, decays = [], []
    for dt_t, du_t, B_t in zip(dt_c.unbind(0), du_c.unbind(0), B_c.unbind(0)):
        decay = torch.exp(dt_t[:, :, None, :] * A_k)  # (B, D, N, K)
        h = decay * h + du_t[:, :, None, :] * B_t[:, None, :, :]  # (B, D, N, K)
        decay_from_start = decay if decay_from_start is None else decay_from_start * decay
        local.append(h)
        decays.append(decay_from_start)

    # 2. carry the state across chunks
    h = u.new_zeros(Bsz, Dm, N) if initial_state is None else initial_state.to(u.dtype)  # (B, D, N)
    h_in = []
    for decay_k, local_k in zip(decays[-1].unbind(-1), local[-1].unbind(-1)):
        h_in.append(h)
        h = decay_k * h + local_k  # (B, D, N)
    h_in = torch.stack(h_in, dim=-1)  # (B, D, N, K): the state entering each chunk

    # 3. full states, read out by C
    states = torch.stack(local) + torch.stack(decays) * h_in  # (T, B, D, N, K)
    y = torch.einsum("tbdnk,tbnk->bdkt", states, C_c).reshape(Bsz, Dm, K * T)[..., :L]  # (B, D, L)
    out = _scan_output(y, u, D, z, out_dtype)
    return (out, h) if return_last_state else out


def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=True):
    """One step of the recurrence, for generation: state (B, D, N) float32; x, dt, z (B, D);
    B, C (B, N). Returns (y (B, D) in x's dtype, new state). The state is not modified in place."""
    acc = state.dtype
    dt = dt.to(acc) if dt_bias is None else dt.to(acc) + dt_bias.to(acc)
    if dt_softplus:
        dt = F.softplus(dt)  # (B, D)
    xa = x.to(acc)
    state = torch.exp(dt[:, :, None] * A.to(acc)) * state + (dt * xa)[:, :, None] * B.to(acc)[:, None, :]  # (B, D, N)
    y = (state * C.to(acc)[:, None, :]).sum(-1)  # (B, D)
    if D is not None:
        y = y + D.to(acc) * xa
    if z is not None:
        y = y * F.silu(z.to(acc))
    return y.to(x.dtype), state
