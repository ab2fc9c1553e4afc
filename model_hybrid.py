"""
A Jamba-style hybrid: Transformer and Mamba layers in one stack, with Mixture-of-Experts
feed-forward networks in some of them (Lieber et al. 2024, "Jamba: A Hybrid Transformer-Mamba
Language Model", arXiv 2403.19887).

Attention recalls any earlier token exactly, at a cost that grows with the context: the KV
cache holds every past position. A Mamba layer compresses the past into a fixed-size state,
cheap at any length but lossy, so it is weaker at copying and recall. Jamba keeps a few
attention layers for recall and makes the rest Mamba, so the KV cache shrinks by the share of
Mamba layers; MoE in every other feed-forward adds parameters without adding compute per token.

  layers      layer i mixes with attention if i % attn_every == attn_offset, else with Mamba
              (Jamba: 8 and 4, one attention layer in eight: MMMMAMMM); its feed-forward is MoE
              if i % moe_every == moe_offset, else dense (Jamba: 2 and 1, every other layer).
              summary() prints the pattern, e.g. "Md Me Md Me Ad Me Md Me" (d dense, e experts).
  mixers      attention as in model_transformer.py (GQA, flash or explicit); the Mamba block of
              model_mamba.py plus RMSNorm on dt, B and C before the scan (Jamba's cure for loss
              spikes in large models; inner_norm=False turns it off).
  positions   none by default: Jamba found that the Mamba layers tell the attention layers
              where tokens are, so it uses no position encoding; RoPE or ALiBi stay an option.
  ffn         MoE exactly as model_moe.py (router, balance and z-loss, statistics), or dense
              SwiGLU (GELU as an option).
  blocks      pre-RMSNorm before each mixer and each feed-forward, a final norm.
  cache       per layer, keys and values for attention layers (one KVCache over just those)
              and conv + SSM state for Mamba layers (one MambaCache over those): with one
              attention layer in eight the KV cache is 1/8 of an all-attention model's.

The blocks are copies of those in model_transformer.py, model_moe.py and model_mamba.py; `diff`
against them shows what the hybrid changes.

Shapes: B batch, T time (tokens in this call), S cached + new tokens, C d_model,
H query heads, K key/value heads (or d_conv in the Mamba block), D head dim, F feed-forward
hidden size, V vocabulary, E experts (or d_inner in the Mamba block), N tokens in the call
(B * T) or state size in the Mamba block, M token-to-expert assignments, R dt_rank.
"""
import math
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels


@dataclass
class Config:
    vocab_size: int = 256
    block_size: int = 256  # longest context; the KV cache holds this many positions
    d_model: int = 128
    n_layer: int = 8
    attn_every: int = 8  # attention in layers where layer % attn_every == attn_offset, Mamba elsewhere
    attn_offset: int = 4
    # attention
    n_head: int = 4
    n_kv_head: int = 2  # n_head: MHA, 1: MQA, between: GQA
    pos: str = "none"  # none | rope | alibi
    rope_theta: float = 10000.0
    flash: bool = True  # kernels.attention; False runs the explicit formula
    # Mamba
    d_state: int = 16  # N, the size of each channel's hidden state
    d_conv: int = 4  # taps of the causal depthwise convolution
    expand: int = 2  # d_inner = expand * d_model
    dt_rank: int = 0  # rank of the projection that makes dt; 0 picks ceil(d_model / 16)
    dt_min: float = 1e-3  # dt is initialised log-uniform in [dt_min, dt_max]
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    conv_bias: bool = True
    inner_norm: bool = True  # RMSNorm on dt, B and C inside the Mamba layers (Jamba)
    scan: str = "auto"  # auto (Triton on CUDA, chunked elsewhere) | chunked | triton | ref
    # feed-forward: dense
    ffn: str = "swiglu"  # swiglu | gelu
    d_ff: int = 0  # feed-forward hidden size; 0 picks 4 * d_model (gelu) or the matching SwiGLU size
    # feed-forward: mixture of experts
    n_expert: int = 8  # routed experts per MoE layer
    top_k: int = 2  # experts per token
    d_expert: int = 0  # hidden size of one expert; 0 = d_ff. Fine-grained: d_ff / m with m times the experts and k
    n_shared: int = 0  # shared experts of size d_expert that every token passes through (DeepSeekMoE)
    moe_every: int = 2  # MoE in layers where layer % moe_every == moe_offset, dense feed-forward elsewhere
    moe_offset: int = 1
    router: str = "softmax"  # softmax | sigmoid (DeepSeek-V3: bias-based balancing, no balance loss)
    norm_topk: bool = True  # renormalise the k chosen weights to sum to 1
    balance_coef: float = 0.01  # Switch load-balancing loss (softmax router)
    z_coef: float = 0.001  # router z-loss (softmax router)
    bias_rate: float = 0.001  # sigmoid router: step of the balancing bias per training forward
    capacity_factor: float = 0.0  # 0 = dropless; > 0 drops assignments beyond the capacity (not causal)
    expert_path: str = "grouped"  # grouped (sorted tokens, grouped matmuls) | loop (readable)
    # everywhere
    bias: bool = False  # biases in linear layers
    dropout: float = 0.0
    tie_embeddings: bool = True  # the output head reuses the token embedding matrix
    norm_eps: float = 1e-5

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "d_model", "n_layer", "n_head", "n_kv_head", "d_state", "d_conv",
                     "expand", "attn_every", "moe_every"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for every, offset in (("attn_every", "attn_offset"), ("moe_every", "moe_offset")):
            if not 0 <= getattr(self, offset) < getattr(self, every):
                raise ValueError(f"need 0 <= {offset} < {every}, got {offset}={getattr(self, offset)}, "
                                 f"{every}={getattr(self, every)}")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head ({self.n_head}) must be divisible by n_kv_head ({self.n_kv_head})")
        if self.d_model % self.n_head:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_head ({self.n_head})")
        for name, choices in (("pos", ("none", "rope", "alibi")), ("ffn", ("swiglu", "gelu")),
                              ("scan", ("auto", "chunked", "triton", "ref")), ("router", ("softmax", "sigmoid")),
                              ("expert_path", ("grouped", "loop"))):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {'|'.join(choices)}, got {getattr(self, name)!r}")
        self.head_dim = self.d_model // self.n_head
        if self.pos == "rope" and self.head_dim % 2:
            raise ValueError(f"rope needs an even head dim, got d_model/n_head = {self.head_dim}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.d_ff < 0 or self.dt_rank < 0:
            raise ValueError("d_ff and dt_rank must be positive (or 0 for the default)")
        if not 0 < self.dt_min <= self.dt_max:
            raise ValueError(f"need 0 < dt_min <= dt_max, got dt_min={self.dt_min}, dt_max={self.dt_max}")
        if self.d_ff == 0:  # SwiGLU has three matrices to GELU's two: 3 * C * F = 2 * C * 4C
            self.d_ff = 4 * self.d_model if self.ffn == "gelu" else 8 * math.ceil(8 * self.d_model / 3 / 8)
        self.d_inner = self.expand * self.d_model
        self.dt_rank = self.dt_rank or math.ceil(self.d_model / 16)
        self.d_expert = self.d_expert or self.d_ff
        if not 1 <= self.top_k <= self.n_expert:
            raise ValueError(f"top_k must be between 1 and n_expert ({self.n_expert}), got {self.top_k}")
        if self.d_expert < 0 or self.n_shared < 0 or self.capacity_factor < 0:
            raise ValueError("d_expert, n_shared and capacity_factor must be >= 0")
        if self.expert_path == "grouped" and (self.d_expert % 8 or self.d_model % 8):
            raise ValueError(f"expert_path=grouped needs d_expert and d_model divisible by 8 (grouped_mm wants 16-byte "
                             f"rows), got {self.d_expert} and {self.d_model}; use expert_path=loop")
        # the layer pattern: which layers mix with attention, which have an MoE feed-forward
        self.attn_layers = [i for i in range(self.n_layer) if i % self.attn_every == self.attn_offset]
        self.moe_layers = [i for i in range(self.n_layer) if i % self.moe_every == self.moe_offset]
        self.pattern = " ".join(("A" if i in self.attn_layers else "M") + ("e" if i in self.moe_layers else "d")
                                for i in range(self.n_layer))  # e.g. "Md Me Md Me Ad Me Md Me"


# ----------------------------------------------------------------------------- small blocks


class RMSNorm(nn.Module):
    """x / rms(x) * g: LayerNorm without the mean subtraction and the bias. Computed in float32."""

    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.rms_norm(x.float(), (x.size(-1),), self.weight.float(), self.eps).type_as(x)


def alibi_slopes(n_head):
    """Head h penalises distance by m_h, a geometric series 2^(-8/n), 2^(-16/n), ... (Press et al.);
    for a head count that is not a power of two, the paper's recipe adds the odd terms of the next."""
    p = 2 ** math.floor(math.log2(n_head))
    slopes = [2 ** (-8 * (i + 1) / p) for i in range(p)]
    slopes += [2 ** (-4 * (2 * i + 1) / p) for i in range(n_head - p)]
    return torch.tensor(slopes)  # (H,)


def apply_rope(x, cos, sin):
    """Rotate each pair (x_i, x_{i+D/2}) by the angle of its position and frequency."""
    x1, x2 = x.float().chunk(2, dim=-1)  # (B, T, H, D/2) each; cos and sin are (T, 1, D/2)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).type_as(x)


class KVCache:
    """Keys and values of the positions seen so far, for all layers. It stores n_kv_head heads,
    not n_head: that saving is the point of GQA and MQA."""

    def __init__(self, n_layer, batch_size, n_kv_head, max_len, head_dim, device, dtype):
        self.k = torch.zeros(n_layer, batch_size, n_kv_head, max_len, head_dim, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.len = 0  # positions filled; the model advances it after each forward

    def update(self, layer, k, v):
        """Append this call's k, v (B, K, T, D); return everything so far (B, K, S, D)."""
        end = self.len + k.size(2)
        self.k[layer, :, :, self.len:end] = k
        self.v[layer, :, :, self.len:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


class MambaCache:
    """What generation carries from token to token, for all layers: the convolution's last
    K - 1 inputs and the scan state. Its size does not depend on the context length."""

    def __init__(self, n_layer, batch_size, d_inner, d_conv, d_state, device, dtype):
        self.conv = torch.zeros(n_layer, batch_size, d_inner, d_conv - 1, device=device, dtype=dtype)
        self.ssm = torch.zeros(n_layer, batch_size, d_inner, d_state, device=device, dtype=torch.float32)
        self.len = 0  # tokens seen; the model advances it after each forward


class HybridCache:
    """What generation carries for the whole stack: a KVCache over the attention layers only and
    a MambaCache over the Mamba layers only, each indexed by the layer's place among its kind."""

    def __init__(self, kv, ssm):
        self.kv, self.ssm = kv, ssm

    @property
    def len(self):  # tokens seen; the model advances it after each forward, and so both parts
        return self.kv.len

    @len.setter
    def len(self, n):
        self.kv.len = self.ssm.len = n


# ----------------------------------------------------------------------------- the mixers


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        H, K, D = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.qkv = nn.Linear(cfg.d_model, (H + 2 * K) * D, bias=cfg.bias)
        self.out_proj = nn.Linear(H * D, cfg.d_model, bias=cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)
        if cfg.pos == "alibi":
            self.register_buffer("alibi", alibi_slopes(H), persistent=False)

    def forward(self, x, rope, cache, layer):
        cfg = self.cfg
        B, T, C = x.shape
        H, K, D = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        qk, v = self.qkv(x).split([(H + K) * D, K * D], dim=-1)
        qk = qk.view(B, T, H + K, D)  # queries and keys side by side: RoPE rotates both in one go
        if rope is not None:
            qk = apply_rope(qk, *rope)
        q, k = qk.transpose(1, 2).split([H, K], dim=1)  # (B, H, T, D), (B, K, T, D)
        v = v.view(B, T, K, D).transpose(1, 2)  # (B, K, T, D)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, K, S, D)
        alibi = self.alibi if cfg.pos == "alibi" else None
        if cfg.flash:
            y = kernels.attention(q, k, v, causal=True, alibi_slopes=alibi)  # (B, H, T, D)
        else:
            y = self.explicit(q, k, v, alibi)
        y = y.transpose(1, 2).reshape(B, T, H * D)  # (B, T, H*D)
        return self.drop(self.out_proj(y))

    def explicit(self, q, k, v, alibi):
        """softmax(q k^T / sqrt(D) + bias, masked to the past) v, exactly as written in the paper."""
        H, T, D = q.size(1), q.size(2), q.size(3)
        S = k.size(2)
        k = k.repeat_interleave(H // k.size(1), dim=1)  # (B, H, S, D): each K/V head serves H/K query heads
        v = v.repeat_interleave(H // v.size(1), dim=1)  # (B, H, S, D)
        scores = (q @ k.transpose(-2, -1)).float() / math.sqrt(D)  # (B, H, T, S)
        i = torch.arange(S - T, S, device=q.device)[:, None]  # query positions (T, 1): the last T of S
        j = torch.arange(S, device=q.device)[None, :]  # key positions (1, S)
        if alibi is not None:
            scores = scores - alibi.view(H, 1, 1) * (i - j)  # (B, H, T, S): farther back, lower score
        scores = scores.masked_fill(j > i, float("-inf"))  # causal: no looking ahead
        return torch.softmax(scores, dim=-1).type_as(v) @ v  # (B, H, T, D)


class Mixer(nn.Module):
    """The Mamba block: in_proj -> (causal conv -> SiLU -> selective scan) * SiLU(z) -> out_proj."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        E, N, R = cfg.d_inner, cfg.d_state, cfg.dt_rank
        self.in_proj = nn.Linear(cfg.d_model, 2 * E, bias=cfg.bias)
        self.conv1d = nn.Conv1d(E, E, cfg.d_conv, groups=E, bias=cfg.conv_bias)  # depthwise; padded by hand
        self.x_proj = nn.Linear(E, R + 2 * N, bias=False)  # dt (low rank), B and C from the input
        if cfg.inner_norm:  # Jamba: dt, B and C at a fixed scale, whatever x_proj learns
            self.dt_norm = RMSNorm(R, cfg.norm_eps)
            self.B_norm, self.C_norm = RMSNorm(N, cfg.norm_eps), RMSNorm(N, cfg.norm_eps)
        self.dt_proj = nn.Linear(R, E, bias=True)
        self.A_log = nn.Parameter(torch.empty(E, N))
        self.D = nn.Parameter(torch.empty(E))
        self.A_log._no_weight_decay = True  # decay would pull A towards -1 and D towards 0
        self.D._no_weight_decay = True
        self.out_proj = nn.Linear(E, cfg.d_model, bias=cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)
        self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self):
        """The initialisation of the official code. The model calls it again after its generic
        init, which would otherwise overwrite dt_proj with N(0, 0.02) weights and a zero bias."""
        cfg = self.cfg
        E, N, R = cfg.d_inner, cfg.d_state, cfg.dt_rank
        nn.init.uniform_(self.dt_proj.weight, -R ** -0.5, R ** -0.5)
        # dt = softplus(dt_proj(...) + bias) starts log-uniform in [dt_min, dt_max]: the bias
        # is the inverse softplus of such a dt, log(exp(dt) - 1) = dt + log(1 - exp(-dt))
        dt = torch.exp(torch.rand(E) * (math.log(cfg.dt_max) - math.log(cfg.dt_min)) + math.log(cfg.dt_min))
        dt = dt.clamp(min=cfg.dt_init_floor)
        self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        # S4D-real: A = -(1, 2, ..., N) in every channel, stored as log(-A) so that A stays negative
        self.A_log.copy_(torch.log(torch.arange(1, N + 1, dtype=torch.float32)).repeat(E, 1))  # (E, N)
        self.D.fill_(1.0)

    def forward(self, x, cache, layer):
        cfg = self.cfg
        B, T, C = x.shape
        R, N, K = cfg.dt_rank, cfg.d_state, cfg.d_conv
        x, z = self.in_proj(x).transpose(1, 2).chunk(2, dim=1)  # (B, E, T) each
        # causal convolution: the K - 1 inputs before this chunk are zeros or come from the cache
        past = F.pad(x, (K - 1, 0))[..., :K - 1] if cache is None else cache.conv[layer]  # (B, E, K-1)
        x_full = torch.cat((past.to(x.dtype), x), dim=-1)  # (B, E, K-1+T)
        if cache is not None:
            cache.conv[layer] = x_full[..., x_full.size(-1) - (K - 1):]  # the last K-1 inputs (none if K = 1)
        x = F.silu(self.conv1d(x_full))  # (B, E, T)
        dt, Bm, Cm = self.x_proj(x.transpose(1, 2)).split([R, N, N], dim=-1)  # (B, T, R), (B, T, N) x2
        if cfg.inner_norm:  # large activations here made Jamba's loss spike; normalised, they cannot grow
            dt, Bm, Cm = self.dt_norm(dt), self.B_norm(Bm), self.C_norm(Cm)
        dt = (dt @ self.dt_proj.weight.t()).transpose(1, 2)  # (B, E, T); the bias goes in the scan
        Bm, Cm = Bm.transpose(1, 2), Cm.transpose(1, 2)  # (B, N, T)
        A = -torch.exp(self.A_log.float())  # (E, N)
        if cache is not None and T == 1:  # decoding: one step of the recurrence
            y, cache.ssm[layer] = kernels.selective_state_update(
                cache.ssm[layer], x[..., 0], dt[..., 0], A, Bm[..., 0], Cm[..., 0], self.D.float(), z[..., 0],
                dt_bias=self.dt_proj.bias.float(), dt_softplus=True)
            y = y[..., None]  # (B, E, 1)
        else:
            impl = None if cfg.scan == "auto" else cfg.scan
            y = kernels.selective_scan(x, dt, A, Bm, Cm, self.D.float(), z, delta_bias=self.dt_proj.bias.float(),
                                       delta_softplus=True, initial_state=None if cache is None else cache.ssm[layer],
                                       return_last_state=cache is not None, impl=impl)  # (B, E, T)
            if cache is not None:
                y, cache.ssm[layer] = y
        return self.drop(self.out_proj(y.transpose(1, 2)))  # (B, T, C)


# ----------------------------------------------------------------------------- the feed-forwards


class MLP(nn.Module):
    """GPT-2's feed-forward: C -> F -> C with a GELU between."""

    def __init__(self, cfg):
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias)
        self.out_proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x):
        return self.drop(self.out_proj(F.gelu(self.fc(x))))


class SwiGLU(nn.Module):
    """LLaMA's feed-forward: (SiLU(x W_gate) * x W_up) W_out. Gate and up are one matmul."""

    def __init__(self, cfg):
        super().__init__()
        self.gate_up = nn.Linear(cfg.d_model, 2 * cfg.d_ff, bias=cfg.bias)
        self.out_proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x):
        gate, up = self.gate_up(x).chunk(2, dim=-1)  # (B, T, F) each
        return self.drop(self.out_proj(F.silu(gate) * up))


def segment_mm(a, b, ends):
    """Rows ends[e-1]:ends[e] of a (M, X) times b[e] (X, Y), for every e -> (M, Y). grouped_mm does
    all segments in one call; a torch without it loops over them."""
    if hasattr(F, "grouped_mm"):
        return F.grouped_mm(a, b, offs=ends)
    starts = [0] + ends[:-1].tolist()
    return torch.cat([a[s:e] @ b[i] for i, (s, e) in enumerate(zip(starts, ends.tolist()))])


class MoE(nn.Module):
    """E expert feed-forward networks (SwiGLU or GELU, as cfg.ffn, no biases) and a router that
    sends each token to top_k of them; the output is the weighted sum of their outputs."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        E, C, F_ = cfg.n_expert, cfg.d_model, cfg.d_expert
        self.router = nn.Linear(C, E, bias=False)  # small random init from Model._init_weights, never zero
        width = 2 * F_ if cfg.ffn == "swiglu" else F_  # gate and up side by side, as in SwiGLU.gate_up
        self.w_in = nn.Parameter(torch.randn(E, C, width) * 0.02)  # (E, C, 2F)
        self.w_out = nn.Parameter(torch.randn(E, F_, C) * 0.02 / math.sqrt(2 * cfg.n_layer))  # (E, F, C), like out_proj
        if cfg.router == "sigmoid":  # part of the state (checkpointed), not a parameter: no gradient moves it
            self.register_buffer("route_bias", torch.zeros(E))
        self.shared = None
        if cfg.n_shared:  # n_shared experts that every token uses are one feed-forward of n_shared times the width
            shared_cfg = replace(cfg, d_ff=cfg.n_shared * cfg.d_expert, dropout=0.0)
            self.shared = SwiGLU(shared_cfg) if cfg.ffn == "swiglu" else MLP(shared_cfg)
        self.drop = nn.Dropout(cfg.dropout)
        self.losses = None  # (balance, z) of the last forward, for Model.forward to add to the loss
        self.last = None  # router statistics of the last forward, for Model.stats

    def forward(self, x):
        B, T, C = x.shape
        x = x.reshape(B * T, C)  # (N, C): routing is per token, batch and time do not matter
        tok, expert, weight = self.route(x)  # (M,) each: who goes where, with what weight
        if self.cfg.expert_path == "grouped":
            y = self.experts_grouped(x, tok, expert, weight)
        else:
            y = self.experts_loop(x, tok, expert, weight)
        if self.shared is not None:
            y = y + self.shared(x)
        return self.drop(y).view(B, T, C)

    def route(self, x):
        cfg, N, E, k = self.cfg, x.size(0), self.cfg.n_expert, self.cfg.top_k
        with torch.autocast(x.device.type, enabled=False):  # float32 even under bf16 autocast, so that
            logits = F.linear(x.float(), self.router.weight.float())  # (N, E)  # rounding cannot flip a choice
        if cfg.router == "softmax":
            probs = logits.softmax(dim=-1)  # (N, E)
            weight, expert = probs.topk(k, dim=-1)  # (N, k) each; k distinct experts per token
        else:
            probs = logits.sigmoid()  # (N, E)
            expert = (probs + self.route_bias).topk(k, dim=-1).indices  # (N, k): the bias chooses...
            weight = probs.gather(-1, expert)  # (N, k)                 # ...but does not weight
        if cfg.norm_topk:
            weight = weight / weight.sum(dim=-1, keepdim=True)
        counts = torch.bincount(expert.flatten(), minlength=E)  # (E,) assignments each expert was asked for
        load = counts.float() / (N * k)  # (E,) f_e, sums to 1
        if cfg.router == "softmax":
            balance = E * (load * probs.mean(dim=0)).sum()  # gradient flows through P_e, not the counts
            z = torch.logsumexp(logits, dim=-1).square().mean()
            self.losses = (balance, z)
        elif self.training:
            # DeepSeek-V3 nudges the bias after each step; here after each training forward (so
            # train.py need not know), from this batch's load: overloaded experts become less
            # likely to be chosen, underloaded ones more. It changes no output of this forward.
            with torch.no_grad():
                self.route_bias += cfg.bias_rate * torch.sign(counts.float().mean() - counts)
        self.last = {"load": load.detach(), "dropped": torch.zeros(()),
                     "top1": (probs.max(dim=-1).values / probs.sum(dim=-1)).mean().detach()}
        tok = torch.arange(N, device=x.device).repeat_interleave(k)  # (N * k,) token-major, like expert and weight
        if cfg.capacity_factor == 0:
            return tok, expert.flatten(), weight.flatten()  # (M,) each
        keep = self.within_capacity(expert).flatten()  # (N * k,)
        self.last["dropped"] = 1 - keep.float().mean()
        return tok[keep], expert.flatten()[keep], weight.flatten()[keep]  # (M,) each

    def within_capacity(self, expert):
        """Which of the (N, k) assignments fit: each expert takes at most capacity_factor * N * k / E.
        As in GShard, every token's first choice queues before any second choice, each in token
        order (batch-major). So a later token's first choice can push out an earlier token's
        second choice, and sequence 0 fills the queues before sequence 1: an output depends on
        later positions and on other sequences. The capacity also depends on N, so a prefix, or
        one decoding step, drops differently from the full sequence. Not causal: for training only."""
        N, k = expert.shape
        E = self.cfg.n_expert
        capacity = math.ceil(self.cfg.capacity_factor * N * k / E)
        queue = F.one_hot(expert.t().reshape(-1), E)  # (k * N, E): slot-major
        place = (queue.cumsum(dim=0) * queue).sum(dim=-1) - 1  # (k * N,) place in its expert's queue
        return (place < capacity).view(k, N).t()  # (N, k)

    def act(self, h):
        if self.cfg.ffn == "swiglu":
            gate, up = h.chunk(2, dim=-1)  # (M, F) each
            return F.silu(gate) * up
        return F.gelu(h)

    def experts_loop(self, x, tok, expert, weight):
        """The readable path: for each expert, gather its tokens, run its feed-forward, add back weighted."""
        y = torch.zeros_like(x)  # (N, C)
        for e in range(self.cfg.n_expert):
            mine = expert == e
            t = tok[mine]  # tokens routed to e
            h = self.act(x[t] @ self.w_in[e]) * weight[mine, None]  # (tokens of e, F), weighted here:
            y = y.index_add(0, t, (h @ self.w_out[e]).type_as(x))  # F is narrower than C
        return y

    def experts_grouped(self, x, tok, expert, weight):
        """The fast path: sort the assignments by expert so that each expert's tokens are one
        contiguous segment, then two grouped matmuls run all experts at once."""
        order = torch.argsort(expert, stable=True)  # stable: the same order of additions as the loop
        tok, weight = tok[order], weight[order]  # (M,) each, grouped by expert
        ends = torch.bincount(expert, minlength=self.cfg.n_expert).cumsum(0).to(torch.int32)  # (E,)
        # grouped_mm is not on autocast's list: cast to the autocast dtype by hand, as autocast would
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        h = segment_mm(x.index_select(0, tok).to(dtype), self.w_in.to(dtype), ends)  # (M, 2F)
        h = segment_mm((self.act(h) * weight[:, None]).to(dtype), self.w_out.to(dtype), ends)  # (M, C)
        return torch.zeros_like(x).index_add(0, tok, h.type_as(x))

    def num_expert_params(self):
        return self.w_in[0].numel() + self.w_out[0].numel()  # one routed expert


class Block(nn.Module):
    """Pre-norm residual: x + mixer(norm(x)), then x + ffn(norm(x)). The mixer is attention or
    Mamba, the feed-forward MoE or dense, as the layer pattern says."""

    def __init__(self, cfg, layer):
        super().__init__()
        self.norm1, self.norm2 = RMSNorm(cfg.d_model, cfg.norm_eps), RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attention = layer in cfg.attn_layers
        self.mixer = Attention(cfg) if self.attention else Mixer(cfg)
        if layer in cfg.moe_layers:
            self.ffn = MoE(cfg)
        else:
            self.ffn = SwiGLU(cfg) if cfg.ffn == "swiglu" else MLP(cfg)

    def forward(self, x, rope, cache, index):
        """index: the layer's place among the attention layers, or among the Mamba layers."""
        h = self.norm1(x)
        if self.attention:
            x = x + self.mixer(h, rope, None if cache is None else cache.kv, index)
        else:
            x = x + self.mixer(h, None if cache is None else cache.ssm, index)
        return x + self.ffn(self.norm2(x))


# ----------------------------------------------------------------------------- the model


class Model(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        if cfg.pos == "rope":
            inv_freq = cfg.rope_theta ** (-torch.arange(0, cfg.head_dim, 2, dtype=torch.float32) / cfg.head_dim)
            self.register_buffer("inv_freq", inv_freq, persistent=False)  # (D/2,)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, layer) for layer in range(cfg.n_layer))
        # where each layer's state lives in the cache: its place among the layers of its kind
        self.cache_index = [sum(b.attention == block.attention for b in self.blocks[:i])
                            for i, block in enumerate(self.blocks)]
        self.norm_f = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: each residual branch adds to the stream,
            if name.endswith("out_proj.weight"):  # so scale their output layers by 1/sqrt(2 * depth)
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))  # two branches per layer
        for block in self.blocks:  # after the generic init, which must not touch dt_proj, A_log, D
            if not block.attention:
                block.mixer.reset_ssm_parameters()
        self.aux = {}

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx, targets=None, cache=None):
        cfg = self.config
        B, T = idx.shape
        start = cache.len if cache is not None else 0
        if start + T > cfg.block_size:
            raise ValueError(f"sequence of {start + T} tokens is longer than block_size {cfg.block_size}")
        x = self.drop(self.wte(idx))  # (B, T, C): no position embedding; the Mamba layers know the order
        rope = None
        if cfg.pos == "rope":
            pos = torch.arange(start, start + T, device=idx.device)  # (T,)
            angle = (pos[:, None].float() * self.inv_freq)[:, None, :]  # (T, 1, D/2)
            rope = (angle.cos(), angle.sin())
        for block, index in zip(self.blocks, self.cache_index):
            x = block(x, rope, cache, index)
        if cache is not None:
            cache.len += T
        logits = self.lm_head(self.norm_f(x)).float()  # (B, T, V)
        loss = None
        if targets is not None:  # targets of -1 are ignored (the synthetic tasks score answers only)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
            self.aux = {"ce": loss.detach()}
            moes = [m for m in self.modules() if isinstance(m, MoE) and m.losses is not None]
            if moes:  # per layer, averaged: each reads 1.0 (balance) at perfect balance whatever the depth
                balance = torch.stack([m.losses[0] for m in moes]).mean()
                z = torch.stack([m.losses[1] for m in moes]).mean()
                loss = loss + cfg.balance_coef * balance + cfg.z_coef * z
                self.aux.update(balance=balance.detach(), z=z.detach())
        return logits, loss

    # ------------------------------------------------------------------------- generation

    def new_cache(self, batch_size, max_len=None, device=None, dtype=None):
        """Keys and values for max_len (default block_size) positions in the attention layers;
        a fixed-size conv + SSM state in the Mamba layers."""
        cfg = self.config
        p = self.wte.weight
        device, dtype = device or p.device, dtype or p.dtype
        n_attn = len(cfg.attn_layers)
        kv = KVCache(n_attn, batch_size, cfg.n_kv_head, max_len or cfg.block_size, cfg.head_dim, device, dtype)
        ssm = MambaCache(cfg.n_layer - n_attn, batch_size, cfg.d_inner, cfg.d_conv, cfg.d_state, device, dtype)
        return HybridCache(kv, ssm)

    def cache_bytes(self, cache):
        return cache.kv.k.nbytes + cache.kv.v.nbytes + cache.ssm.conv.nbytes + cache.ssm.ssm.nbytes

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None):
        """Yield (B, 1) new tokens: the prompt goes through in one parallel pass that fills the KV
        cache of the attention layers and the states of the Mamba layers, then each step feeds
        only the newest token. When the context reaches block_size (the KV cache is full), the
        window slides: the cache is rebuilt from the most recent half of it."""
        idx = idx[:, -self.config.block_size:]
        cache = self.new_cache(idx.size(0))
        logits, _ = self(idx, cache=cache)
        for _ in range(max_new_tokens):
            tok = sample_next(logits[:, -1], temperature, top_k, top_p)  # (B, 1)
            yield tok
            idx = torch.cat((idx, tok), dim=1)
            if cache.len == self.config.block_size:
                cache = self.new_cache(idx.size(0))
                idx = idx[:, -self.config.block_size // 2:]
                logits, _ = self(idx, cache=cache)
            else:
                logits, _ = self(tok, cache=cache)

    # ------------------------------------------------------------------------- accounting

    def num_params(self, active=False):
        n = sum(p.numel() for p in self.parameters())
        if active:  # per token, only top_k of the n_expert routed experts of each MoE layer run
            n -= sum((m.cfg.n_expert - m.cfg.top_k) * m.num_expert_params() for m in self.modules() if isinstance(m, MoE))
        return n

    def flops_per_token(self):
        """Training FLOPs per token: 6 per weight in a matrix multiply or the convolution (2 forward,
        4 backward), only the active experts counted; plus, per attention layer, the scores and
        weighted sum (12 * heads * D * context), and per Mamba layer the scan (27 * E * N)."""
        cfg = self.config
        weights = sum(m.weight.numel() for m in self.modules() if isinstance(m, (nn.Linear, nn.Conv1d)))
        weights += sum(m.cfg.top_k * m.num_expert_params() for m in self.modules() if isinstance(m, MoE))
        n_attn = len(cfg.attn_layers)
        return (6 * weights + 12 * n_attn * cfg.n_head * cfg.head_dim * cfg.block_size
                + 27 * (cfg.n_layer - n_attn) * cfg.d_inner * cfg.d_state)

    def optim_groups(self, weight_decay):
        """Matrices decay; vectors (norm gains, biases) and anything marked _no_weight_decay do not."""
        decays = {p: p.dim() >= 2 and not getattr(p, "_no_weight_decay", False) for p in self.parameters()}
        return [{"params": [p for p, d in decays.items() if d], "weight_decay": weight_decay},
                {"params": [p for p, d in decays.items() if not d], "weight_decay": 0.0}]

    def summary(self):
        cfg = self.config
        kind = "MHA" if cfg.n_kv_head == cfg.n_head else "MQA" if cfg.n_kv_head == 1 else "GQA"
        return (f"layers {cfg.pattern} (A attention, M Mamba; e MoE, d dense feed-forward); "
                f"{kind} ({cfg.n_head} query / {cfg.n_kv_head} K/V heads of {cfg.head_dim}), {cfg.pos} positions; "
                f"Mamba d_inner {cfg.d_inner}, state {cfg.d_state}, {'with' if cfg.inner_norm else 'no'} dt/B/C norm; "
                f"top-{cfg.top_k} of {cfg.n_expert} experts of {cfg.d_expert}, dense {cfg.ffn} {cfg.d_ff}")

    def layer_stats(self):
        """Per MoE layer, from its last forward: the load share of every expert, max violation
        (max load / mean load - 1), load entropy / ln E (1 = uniform), experts that got no token,
        share of assignments dropped for capacity, mean top-1 router probability."""
        out = []
        for m in self.modules():
            if isinstance(m, MoE) and m.last is not None:
                load = m.last["load"]  # (E,)
                entropy = -(load * load.clamp_min(1e-12).log()).sum() / math.log(len(load))
                out.append({"load": load.tolist(), "max_violation": (load.max() / load.mean() - 1).item(),
                            "entropy": entropy.item(), "dead": int((load == 0).sum()),
                            "dropped": m.last["dropped"].item(), "top1": m.last["top1"].item()})
        return out

    def stats(self):
        """A compact summary of layer_stats for the log: mean over MoE layers and the worst layer."""
        layers = self.layer_stats()
        if not layers:
            return {}
        mean = lambda key: sum(s[key] for s in layers) / len(layers)
        return {"moe_vio": mean("max_violation"), "moe_vio_worst": max(s["max_violation"] for s in layers),
                "moe_ent": mean("entropy"), "moe_ent_worst": min(s["entropy"] for s in layers),
                "moe_dead": float(sum(s["dead"] for s in layers)), "moe_drop": mean("dropped"), "moe_top1": mean("top1")}


def sample_next(logits, temperature=1.0, top_k=None, top_p=None):
    """(B, V) logits -> (B, 1) tokens. temperature 0 is greedy; top_k keeps the k likeliest;
    top_p keeps the smallest set of tokens whose probability adds up to p (nucleus sampling)."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
        probs = torch.softmax(sorted_logits, dim=-1)
        outside = probs.cumsum(dim=-1) - probs > top_p  # mass before this token already reaches p
        sorted_logits = sorted_logits.masked_fill(outside, float("-inf"))
        logits = logits.scatter(-1, order, sorted_logits)
    return torch.multinomial(torch.softmax(logits, dim=-1), num_samples=1)
