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
# (arrives with the Mamba issue)
