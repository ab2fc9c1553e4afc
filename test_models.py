import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton kernels run on the CPU in tests; set before kernels import

import math

import pytest
import torch

import kernels


# ----------------------------------------------------------------------------- kernels: attention
# The Triton kernel runs under the interpreter on the CPU here (on a GPU when TRITON_INTERPRET=0,
# see gpu_check.sh). Each case is checked, output and all three gradients, against the float64
# formula; the kernel's error must be within 2x the error of PyTorch doing the same math at the
# input precision (attention_ref on the same fp32/fp16 tensors), the flash-attention project's
# rule. Plus a floor of 16 float32 ulps of the largest reference value: the kernel accumulates in
# float32 in another order than PyTorch and rebuilds p = exp(s - lse) from the stored row
# log-sum-exp, which measured up to ~11 ulps (200 fp32 runs of these cases), so below that
# neither error means anything. It is 4e-6 relative at most, far under what a wrong mask or
# scale costs, and ~1/500 of one fp16 ulp, so the fp16 cases are held to the plain 2x rule.
TRITON_DEVICE = "cpu" if kernels.INTERPRET else "cuda"
needs_triton = pytest.mark.skipif(not kernels.INTERPRET and not torch.cuda.is_available(),
                                  reason="Triton needs TRITON_INTERPRET=1 or a CUDA GPU")
needs_gpu = pytest.mark.skipif(kernels.INTERPRET or not torch.cuda.is_available(),
                               reason="needs a CUDA GPU and TRITON_INTERPRET unset")
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16

# (B, H, Hkv, Tq, Tk, D, causal, alibi, dtype): every listed feature and value at least once,
# not the full cross product (the interpreter is slow). Lengths 1, 17, 100, 257 (257 spans three
# query tiles of 128 and five key tiles of 64 with a ragged tail); head dims 16, 48 (padded to 64
# inside the kernel), 64, 128; MHA, GQA (groups of 2 and 3), MQA.
ATTENTION_CASES = [
    (2, 2, 2, 17, 17, 16, True, False, F32),  # MHA, short ragged tile
    (1, 4, 1, 257, 257, 64, True, True, F16),  # MQA + ALiBi, several tiles each way
    (2, 4, 2, 100, 100, 48, False, True, F16),  # GQA, non-causal, non-power-of-two head dim
    (4, 4, 2, 1, 1, 48, True, False, F16),  # a single token (B=4: enough elements for a stable max error)
    (1, 2, 1, 1, 100, 64, True, False, F32),  # decode: one query against a cache
    (1, 6, 2, 17, 257, 48, True, True, F32),  # chunked prefill, groups of 3, ALiBi
    (1, 2, 2, 100, 257, 16, False, False, F16),  # Tq < Tk without the causal mask
    # More queries than keys (a cross-attention shape), without ALiBi: here the first queries sit up
    # to 257 positions before every key, so with ALiBi all their scores are ~-100 and rebuilding
    # p = exp(s - lse) in the backward from such large numbers costs float32 digits (dq measured at
    # up to 2.3x PyTorch's error). Causal or self-attention rows always have a key at distance 0.
    (1, 4, 4, 257, 100, 64, False, False, F32),
    (1, 2, 1, 130, 130, 128, True, True, F16),  # largest head dim; second query tile has full key tiles
    # bf16: under the interpreter the tiles are upcast after loading, so this checks the wiring;
    # the GPU run (gpu_check.sh) checks bf16 arithmetic itself.
    (2, 4, 2, 100, 130, 48, True, True, BF16),
]


def make_inputs(B, H, Hkv, Tq, Tk, D, alibi, dtype, device):
    q = torch.randn(B, H, Tq, D, device=device, dtype=dtype)
    k = torch.randn(B, Hkv, Tk, D, device=device, dtype=dtype)
    v = torch.randn(B, Hkv, Tk, D, device=device, dtype=dtype)
    do = torch.randn(B, H, Tq, D, device=device, dtype=dtype)
    slopes = torch.rand(H, device=device) * 0.5 + 0.05 if alibi else None  # in the range of the ALiBi paper's slopes
    return q, k, v, do, slopes


def run_with_grads(fn, q, k, v, do, **kw):
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    o = fn(q, k, v, **kw)
    return (o, *torch.autograd.grad(o, (q, k, v), do.to(o.dtype)))


def assert_close_to_float64(fn, q, k, v, do, causal, slopes):
    """fn's output and gradients against float64, held to 2x PyTorch's error at the input precision."""
    got = run_with_grads(fn, q, k, v, do, causal=causal, alibi_slopes=slopes)
    exact = run_with_grads(kernels.attention_ref, q.double(), k.double(), v.double(), do.double(),
                           causal=causal, alibi_slopes=slopes)
    same_precision = run_with_grads(kernels.attention_ref, q, k, v, do, causal=causal, alibi_slopes=slopes)
    ulp32 = torch.finfo(torch.float32).eps
    for name, a, ref, pt in zip(["out", "dq", "dk", "dv"], got, exact, same_precision):
        assert a.dtype == q.dtype and a.shape == ref.shape
        err = (a.double() - ref).abs().max().item()  # NaN (an unwritten element) fails below
        err_pt = (pt.double() - ref).abs().max().item()
        floor = 16 * ulp32 * max(1.0, ref.abs().max().item())
        assert err <= 2 * err_pt + floor, f"{name}: error {err:.3g} > 2 x PyTorch's {err_pt:.3g} + {floor:.2g}"


@pytest.fixture
def poisoned(monkeypatch):
    """Every buffer a kernel writes starts as NaN, so an element it forgot to write fails."""
    def nan_output(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    monkeypatch.setattr(kernels, "_new_output", nan_output)


@needs_triton
@pytest.mark.parametrize("B,H,Hkv,Tq,Tk,D,causal,alibi,dtype", ATTENTION_CASES)
def test_attention_triton_matches_float64(B, H, Hkv, Tq, Tk, D, causal, alibi, dtype, poisoned):
    q, k, v, do, slopes = make_inputs(B, H, Hkv, Tq, Tk, D, alibi, dtype, TRITON_DEVICE)
    assert_close_to_float64(lambda *a, **kw: kernels.attention(*a, impl="triton", **kw), q, k, v, do, causal, slopes)


@needs_triton
@pytest.mark.parametrize("causal,alibi,Tq,Tk", [(True, True, 17, 100), (False, False, 100, 100)])
def test_attention_triton_keeps_row_logsumexp(causal, alibi, Tq, Tk, poisoned):
    B, H, Hkv, D = 1, 4, 2, 48
    q, k, v, _, slopes = make_inputs(B, H, Hkv, Tq, Tk, D, alibi, F32, TRITON_DEVICE)
    o, lse = kernels._flash_forward(q, k, v, causal, slopes, 1 / math.sqrt(D))
    kd = k.double().repeat_interleave(H // Hkv, dim=1)  # (B, H, Tk, D)
    s = q.double() @ kd.transpose(-2, -1) / math.sqrt(D)  # (B, H, Tq, Tk)
    i, j = torch.arange(Tk - Tq, Tk, device=s.device)[:, None], torch.arange(Tk, device=s.device)[None, :]
    if alibi:
        s = s - slopes.double().view(H, 1, 1) * (i - j).abs()
    if causal:
        s = s.masked_fill(j > i, float("-inf"))
    assert lse.shape == (B, H, Tq) and lse.dtype == torch.float32
    assert (lse.double() - s.logsumexp(-1)).abs().max().item() < 1e-5  # fp32 rounding of values ~log(Tk)


@pytest.mark.parametrize("B,H,Hkv,Tq,Tk,D,causal,alibi,dtype", [
    (2, 4, 2, 100, 100, 48, True, False, F32),  # SDPA's own is_causal
    (1, 4, 1, 17, 257, 64, True, True, F32),  # explicit mask: causal aligned to the end + ALiBi
    (8, 8, 2, 1, 100, 64, True, False, F16),  # decode step (enough elements for a stable max error)
    (1, 6, 2, 100, 257, 48, False, True, F16),  # non-causal ALiBi, GQA
])
def test_attention_torch_path_matches_float64(B, H, Hkv, Tq, Tk, D, causal, alibi, dtype):
    q, k, v, do, slopes = make_inputs(B, H, Hkv, Tq, Tk, D, alibi, dtype, "cpu")
    assert_close_to_float64(lambda *a, **kw: kernels.attention(*a, impl="torch", **kw), q, k, v, do, causal, slopes)


@needs_triton
def test_attention_triton_follows_autocast_and_mixed_dtypes():
    q, k, v, do, slopes = make_inputs(1, 4, 2, 17, 40, 16, True, F32, TRITON_DEVICE)
    with torch.autocast(TRITON_DEVICE, dtype=torch.bfloat16):
        o, dq, dk, dv = run_with_grads(lambda *a, **kw: kernels.attention(*a, impl="triton", **kw), q, k, v, do,
                                       causal=True, alibi_slopes=slopes)
    assert o.dtype == BF16 and dq.dtype == dk.dtype == dv.dtype == F32  # gradients come back in the leaves' dtype
    ref = kernels.attention_ref(q.double(), k.double(), v.double(), alibi_slopes=slopes)
    assert (o.double() - ref).abs().max() < 0.05  # bf16 inputs: about 3 significant digits
    o16 = kernels.attention(q.half(), k, v, impl="triton")  # float32 K/V (a cache) with fp16 queries
    ref16 = kernels.attention_ref(q.double(), k.double(), v.double())
    assert o16.dtype == F16 and (o16.double() - ref16).abs().max() < 0.01


def test_attention_dispatch_and_errors():
    q, k, v, _, _ = make_inputs(1, 4, 2, 9, 9, 16, False, F32, "cpu")
    assert torch.equal(kernels.attention(q, k, v), kernels.attention(q, k, v, impl="torch"))  # CPU -> torch
    with pytest.raises(ValueError, match="Tq=9 <= Tk=5"):
        kernels.attention(q, k[:, :, :5], v[:, :, :5])
    with pytest.raises(ValueError, match="multiple"):
        kernels.attention(q, k[:, :1].expand(1, 3, 9, 16), v[:, :1].expand(1, 3, 9, 16))


# On a GPU only (gpu_check.sh): bf16, sizes at which the fast unmasked loop dominates, determinism.
@needs_gpu
@pytest.mark.parametrize("B,H,Hkv,Tq,Tk,D,causal,alibi,dtype", [
    (2, 4, 2, 257, 257, 64, True, True, BF16),
    (1, 4, 1, 17, 300, 48, True, False, BF16),
    (2, 4, 4, 100, 100, 128, False, True, BF16),
    (4, 12, 12, 1024, 1024, 64, True, False, BF16),  # the nanoGPT shape
    (2, 8, 2, 1024, 1024, 64, True, True, F16),
    (1, 8, 2, 4096, 4096, 128, True, False, BF16),
    (1, 8, 8, 2048, 2048, 128, False, False, F16),
    (2, 8, 1, 500, 1500, 96, True, True, BF16),
    (1, 4, 2, 1000, 1000, 80, False, True, F32),
])
def test_attention_triton_gpu_full_size(B, H, Hkv, Tq, Tk, D, causal, alibi, dtype, poisoned):
    q, k, v, do, slopes = make_inputs(B, H, Hkv, Tq, Tk, D, alibi, dtype, "cuda")
    assert_close_to_float64(lambda *a, **kw: kernels.attention(*a, impl="triton", **kw), q, k, v, do, causal, slopes)


@needs_gpu
def test_attention_triton_backward_is_deterministic():
    q, k, v, do, slopes = make_inputs(2, 8, 2, 1024, 1024, 64, True, BF16, "cuda")
    first = run_with_grads(kernels.attention, q, k, v, do, causal=True, alibi_slopes=slopes)
    for _ in range(50):
        again = run_with_grads(kernels.attention, q, k, v, do, causal=True, alibi_slopes=slopes)
        for name, a, b in zip(["out", "dq", "dk", "dv"], first, again):
            assert torch.equal(a, b), f"{name} differs between runs"
