"""
A Mixture-of-Experts Transformer: model_transformer.py with the feed-forward network of some
layers replaced by E expert feed-forward networks and a router that sends each token to k of
them, so the parameter count grows with E while the compute per token grows only with k.
`diff model_transformer.py model_moe.py` shows exactly what MoE changes.

  router      a linear map from the token to E scores, in float32, with a random init
              (zero weights would tie every score and send all tokens to the same experts).
              softmax: token-choice top-k over a softmax (Shazeer et al. 2017; GShard, Lepikhin
              et al. 2020; Switch, Fedus et al. 2021 with k=1), the k weights renormalised to
              sum to 1 (Mixtral; norm_topk=False keeps the raw probabilities).
              sigmoid: independent affinities; a per-expert bias is added only to choose the
              top k, not to weight them, and moves against the load after every training
              forward (DeepSeek-V3's balancing without an auxiliary loss).
  losses      Switch's load-balancing loss E * sum_e f_e * P_e (f_e: share of assignments that
              went to expert e, P_e: mean router probability of e), which is 1 at perfect balance
              and E when every token goes to one expert; the router z-loss mean(logsumexp^2)
              (ST-MoE, Zoph et al. 2022) keeps the logits small. Both per layer, averaged over
              the MoE layers, added to the loss with balance_coef and z_coef.
  capacity    dropless by default: every token reaches its k experts, so a token's output does
              not depend on any other token in its layer and the model stays causal. With
              capacity_factor > 0 each expert takes at most capacity_factor * B*T * k / E
              assignments of the B*T tokens in the call and the rest are dropped (the residual
              carries them); which ones fit depends on the whole batch, later positions
              included, so training is no longer causal (see within_capacity).
  experts     one weight layout: stacked matrices w_in (E, C, 2F) and w_out (E, F, C). Two
              paths: a readable loop over experts, and a fast one that sorts the assignments by
              expert and runs every expert's contiguous segment in one grouped matmul.
  DeepSeekMoE fine-grained experts (Dai et al. 2024): smaller d_expert, more experts, larger k;
              shared experts that every token passes through (n_shared). moe_every / moe_offset
              put MoE in every n-th layer with a dense feed-forward between (Switch, GShard).

Shapes: B batch, T time (tokens in this call), S cached + new tokens, C d_model,
H query heads, G key/value heads (the groups of GQA), D head dim, F feed-forward hidden size, V vocabulary,
E experts, k experts per token (top_k), M token-to-expert assignments (B*T * k, less dropped).
"""
import math
from dataclasses import dataclass, replace
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels


def check(ok, message):
    """One rule of a Config: a ValueError of one line (train.py reports it and exits with code 2)."""
    if not ok:
        raise ValueError(message)


@dataclass
class Config:
    vocab_size: int = 256
    block_size: int = 256  # longest context; the KV cache holds this many positions
    d_model: int = 128
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int = 2  # n_head: MHA, 1: MQA, between: GQA
    pos: str = "rope"  # rope | alibi | learned | sinusoidal | none
    ffn: str = "swiglu"  # swiglu | gelu | gelu_tanh (GPT-2's approximation) | relu
    norm: str = "rmsnorm"  # rmsnorm | layernorm
    prenorm: bool = True  # False: post-norm, as in the original Transformer
    d_ff: int = 0  # feed-forward hidden size; 0 picks 4 * d_model (gelu, relu) or the matching SwiGLU size
    bias: bool = False  # biases in linear layers and LayerNorm (GPT-2 has them)
    dropout: float = 0.0  # on embeddings and residual branches (not attention probabilities: the kernels take none)
    tie_embeddings: bool = False  # True: the output head reuses the token embedding matrix (GPT-2)
    init: str = "fan_in"  # fan_in: PyTorch's defaults, 1/sqrt(fan_in) | gpt2: N(0, 0.02); see Model.init_weights
    rope_theta: float = 10000.0
    rope_scaling: str = "none"  # none | pi | ntk | yarn: stretch RoPE to rope_factor x the trained length
    rope_factor: float = 1.0  # evaluation length / trained length (1: the angles as trained)
    flash: bool = True  # kernels.attention; False runs the explicit formula
    attn_scale: str = "sqrt"  # the scores' scale: sqrt 1/sqrt(head_dim) | one 1 | dim 1/head_dim (muP)
    norm_eps: float = 1e-5
    # mixture of experts
    n_expert: int = 8  # routed experts per MoE layer
    top_k: int = 2  # experts per token
    d_expert: int = 0  # hidden size of one expert; 0 = d_ff. Fine-grained: d_ff / m with m times the experts and k
    n_shared: int = 0  # shared experts of size d_expert that every token passes through (DeepSeekMoE)
    moe_every: int = 1  # MoE in layers where layer % moe_every == moe_offset, dense feed-forward elsewhere
    moe_offset: int = 0
    router: str = "softmax"  # softmax | sigmoid (DeepSeek-V3: bias-based balancing, no balance loss)
    norm_topk: bool = True  # renormalise the k chosen weights to sum to 1
    balance_coef: float = 0.01  # Switch load-balancing loss (softmax router)
    z_coef: float = 0.001  # router z-loss (softmax router)
    bias_rate: float = 0.001  # sigmoid router: step of the balancing bias per training forward
    capacity_factor: float = 0.0  # 0 = dropless; > 0 drops assignments beyond the capacity (not causal)
    expert_path: str = "grouped"  # grouped (sorted tokens, grouped matmuls) | loop (readable)

    def __post_init__(self):  # one line per rule: an impossible value fails here, before any weight is made
        for name in ("vocab_size", "block_size", "d_model", "n_layer", "n_head", "n_kv_head", "rope_theta", "norm_eps", "rope_factor"):
            check(getattr(self, name) > 0, f"{name} must be positive, got {getattr(self, name)}")
        for name, allowed in dict(pos="rope|alibi|learned|sinusoidal|none", ffn="swiglu|gelu|gelu_tanh|relu",
                                  norm="rmsnorm|layernorm", rope_scaling="none|pi|ntk|yarn", init="fan_in|gpt2",
                                  attn_scale="sqrt|one|dim").items():
            check(getattr(self, name) in allowed.split("|"), f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        check(self.n_head % self.n_kv_head == 0, f"n_head ({self.n_head}) must be divisible by n_kv_head ({self.n_kv_head})")
        check(self.d_model % self.n_head == 0, f"d_model ({self.d_model}) must be divisible by n_head ({self.n_head})")
        self.head_dim = self.d_model // self.n_head
        check(self.pos != "rope" or self.head_dim % 2 == 0, f"rope positions need an even head dim, got {self.head_dim}")
        check(self.pos != "sinusoidal" or self.d_model % 2 == 0, f"sinusoidal positions need an even d_model, got {self.d_model}")
        check(0 <= self.dropout < 1, f"dropout must be in [0, 1), got {self.dropout}")
        check(self.d_ff >= 0, f"d_ff must be >= 0 (0: the default), got {self.d_ff}")
        if self.d_ff == 0:  # SwiGLU has three matrices to GELU's two: 3 * C * F = 2 * C * 4C
            self.d_ff = 4 * self.d_model if self.ffn != "swiglu" else 8 * math.ceil(8 * self.d_model / 3 / 8)
        self.d_expert = self.d_expert or self.d_ff
        for name, allowed in dict(router="softmax|sigmoid", expert_path="grouped|loop").items():
            check(getattr(self, name) in allowed.split("|"), f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        check(1 <= self.top_k <= self.n_expert, f"top_k must be between 1 and n_expert ({self.n_expert}), got {self.top_k}")
        check(min(self.d_expert, self.n_shared, self.capacity_factor, self.balance_coef, self.z_coef, self.bias_rate) >= 0,
              "d_expert, n_shared, capacity_factor, balance_coef, z_coef and bias_rate must be >= 0")
        check(0 <= self.moe_offset < self.moe_every, f"need 0 <= moe_offset < moe_every, got {self.moe_offset} and {self.moe_every}")
        check(self.expert_path == "loop" or (self.d_expert % 8 == 0 and self.d_model % 8 == 0),  # grouped_mm: 16-byte rows
              f"expert_path=grouped needs d_expert and d_model divisible by 8, got {self.d_expert} and {self.d_model}; use expert_path=loop")


# ----------------------------------------------------------------------------- small blocks


class RMSNorm(nn.Module):
    """x / rms(x) * g: LayerNorm without the mean subtraction and the bias. Computed in float32."""

    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.rms_norm(x.float(), (x.size(-1),), self.weight.float(), self.eps).type_as(x)


def make_norm(cfg, dim):
    if cfg.norm == "rmsnorm":
        return RMSNorm(dim, cfg.norm_eps)
    return nn.LayerNorm(dim, eps=cfg.norm_eps, bias=cfg.bias)


def sinusoids(T, C):
    """The fixed table of Vaswani et al.: sin and cos of position / 10000^(2i/C)."""
    pos = torch.arange(T, dtype=torch.float32)[:, None]  # (T, 1)
    freq = torch.exp(-math.log(10000.0) * torch.arange(0, C, 2, dtype=torch.float32) / C)  # (C/2,)
    table = torch.zeros(T, C)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq)
    return table  # (T, C)


def alibi_slopes(n_head):
    """Head h penalises distance by m_h, a geometric series 2^(-8/n), 2^(-16/n), ... (Press et al.);
    for a head count that is not a power of two, the paper's recipe adds the odd terms of the next."""
    p = 2 ** math.floor(math.log2(n_head))
    slopes = [2 ** (-8 * (i + 1) / p) for i in range(p)]
    slopes += [2 ** (-4 * (2 * i + 1) / p) for i in range(n_head - p)]
    return torch.tensor(slopes)  # (H,)


def rope_frequencies(cfg):
    """The rotation speed of each pair of a head's dims, theta^(-2i/D) (D/2,), stretched for rope_factor x
    the trained length, which is block_size / rope_factor (see Config)."""
    D, theta, s = cfg.head_dim, cfg.rope_theta, cfg.rope_factor
    if cfg.rope_scaling == "ntk":  # a larger base: the slowest pair turns rope_factor x slower, the fastest as trained
        theta = theta * s ** (D / (D - 2))
    inv_freq = theta ** (-torch.arange(0, D, 2, dtype=torch.float32) / D)  # (D/2,)
    if cfg.rope_scaling == "yarn":  # NTK-by-parts: turns of each pair within the trained length decide
        turns = cfg.block_size / s * inv_freq / (2 * math.pi)  # (D/2,) the paper's r = L / wavelength
        alpha, beta = 1.0, 32.0  # Peng et al.'s bounds for LLaMA: under 1 turn interpolate, over 32 keep
        keep = ((turns - alpha) / (beta - alpha)).clamp(0, 1)  # (D/2,) the ramp gamma(r)
        inv_freq = (1 - keep) * inv_freq / s + keep * inv_freq
    return inv_freq


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
        """Append this call's k, v (B, G, T, D); return everything so far (B, G, S, D)."""
        end = self.len + k.size(2)
        self.k[layer, :, :, self.len:end] = k
        self.v[layer, :, :, self.len:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


# ----------------------------------------------------------------------------- the layer


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        H, G, D = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.qkv = nn.Linear(cfg.d_model, (H + 2 * G) * D, bias=cfg.bias)
        self.out_proj = nn.Linear(H * D, cfg.d_model, bias=cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)
        if cfg.pos == "alibi":
            self.register_buffer("alibi", alibi_slopes(H), persistent=False)
        self.scale = {"sqrt": 1 / math.sqrt(D), "one": 1.0, "dim": 1 / D}[cfg.attn_scale]

    def forward(self, x, rope, cache, layer):
        cfg = self.cfg
        B, T, C = x.shape
        H, G, D = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        qk, v = self.qkv(x).split([(H + G) * D, G * D], dim=-1)
        qk = qk.view(B, T, H + G, D)  # queries and keys side by side: RoPE rotates both in one go
        if rope is not None:
            qk = apply_rope(qk, *rope)
        q, k = qk.transpose(1, 2).split([H, G], dim=1)  # (B, H, T, D), (B, G, T, D)
        v = v.view(B, T, G, D).transpose(1, 2)  # (B, G, T, D)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, G, S, D)
        alibi = self.alibi if cfg.pos == "alibi" else None
        if cfg.flash:
            y = kernels.attention(q, k, v, causal=True, alibi_slopes=alibi, scale=self.scale)  # (B, H, T, D)
        else:
            y = self.explicit(q, k, v, alibi)
        y = y.transpose(1, 2).reshape(B, T, H * D)  # (B, T, H*D)
        return self.drop(self.out_proj(y))

    def explicit(self, q, k, v, alibi):
        """softmax(q k^T * scale + bias, masked to the past) v, exactly as written in the paper (scale 1/sqrt(D))."""
        H, T, S = q.size(1), q.size(2), k.size(2)
        k = k.repeat_interleave(H // k.size(1), dim=1)  # (B, H, S, D): each K/V head serves H/G query heads
        v = v.repeat_interleave(H // v.size(1), dim=1)  # (B, H, S, D)
        scores = (q @ k.transpose(-2, -1)).float() * self.scale  # (B, H, T, S)
        i = torch.arange(S - T, S, device=q.device)[:, None]  # query positions (T, 1): the last T of S
        j = torch.arange(S, device=q.device)[None, :]  # key positions (1, S)
        if alibi is not None:
            scores = scores - alibi.view(H, 1, 1) * (i - j)  # (B, H, T, S): farther back, lower score
        scores = scores.masked_fill(j > i, float("-inf"))  # causal: no looking ahead
        return torch.softmax(scores, dim=-1).type_as(v) @ v  # (B, H, T, D)


class MLP(nn.Module):
    """GPT-2's feed-forward: C -> F -> C with a GELU between (ReLU in the original Transformer)."""

    def __init__(self, cfg):
        super().__init__()
        # GPT-2 was trained with the tanh approximation of GELU; its weights want that curve
        self.act = F.relu if cfg.ffn == "relu" else partial(F.gelu, approximate="tanh" if cfg.ffn == "gelu_tanh" else "none")
        self.fc = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias)
        self.out_proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x):
        return self.drop(self.out_proj(self.act(self.fc(x))))


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
        self.router = nn.Linear(C, E, bias=False)  # random init from Model.init_weights, never zero
        width = 2 * F_ if cfg.ffn == "swiglu" else F_  # gate and up side by side, as in SwiGLU.gate_up
        # the fan_in rule of Model.init_weights (which draws them again, following cfg.init)
        self.w_in = nn.Parameter(torch.empty(E, C, width).uniform_(-C ** -0.5, C ** -0.5))  # (E, C, 2F)
        self.w_out = nn.Parameter(torch.empty(E, F_, C).uniform_(-F_ ** -0.5, F_ ** -0.5))  # (E, F, C)
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
        x = x.reshape(B * T, C)  # (B*T, C): routing is per token, batch and time do not matter
        tok, expert, weight = self.route(x)  # (M,) each: who goes where, with what weight
        if self.cfg.expert_path == "grouped":
            y = self.experts_grouped(x, tok, expert, weight)
        else:
            y = self.experts_loop(x, tok, expert, weight)
        if self.shared is not None:
            y = y + self.shared(x)
        return self.drop(y).view(B, T, C)

    def route(self, x):
        """x (B*T, C) -> tok, expert, weight (M,) each: which token goes to which expert, with what weight."""
        logits, probs = self.scores(x)  # (B*T, E) each
        expert, weight = self.choose(probs)  # (B*T, k) each
        load = self.balance(logits, probs, expert)  # (E,)
        self.last = {"load": load.detach(), "dropped": torch.zeros(()),
                     "top1": (probs.max(dim=-1).values / probs.sum(dim=-1)).mean().detach()}
        tok = torch.arange(x.size(0), device=x.device).repeat_interleave(self.cfg.top_k)  # (B*T*k,) token-major, like expert
        if self.cfg.capacity_factor == 0:
            return tok, expert.flatten(), weight.flatten()  # (M,) each
        keep = self.within_capacity(expert).flatten()  # (B*T*k,)
        self.last["dropped"] = 1 - keep.float().mean()
        return tok[keep], expert.flatten()[keep], weight.flatten()[keep]  # (M,) each

    def scores(self, x):
        """The router's logits and probabilities, in float32 even under bf16 autocast, so that
        rounding cannot flip a choice."""
        with torch.autocast(x.device.type, enabled=False):
            logits = F.linear(x.float(), self.router.weight.float())  # (B*T, E)
        return logits, logits.softmax(dim=-1) if self.cfg.router == "softmax" else logits.sigmoid()

    def choose(self, probs):
        """Each token's top_k experts and their weights."""
        if self.cfg.router == "softmax":
            weight, expert = probs.topk(self.cfg.top_k, dim=-1)  # (B*T, k) each; k distinct experts per token
        else:  # DeepSeek-V3: the bias chooses the experts, but does not weight them
            expert = (probs + self.route_bias).topk(self.cfg.top_k, dim=-1).indices  # (B*T, k)
            weight = probs.gather(-1, expert)  # (B*T, k)
        if self.cfg.norm_topk:
            weight = weight / weight.sum(dim=-1, keepdim=True)
        return expert, weight

    def balance(self, logits, probs, expert):
        """What keeps the experts evenly loaded: the softmax router's balance and z-losses (for
        Model.forward to add to the loss), or the sigmoid router's bias nudge. Returns the load f_e."""
        cfg, E = self.cfg, self.cfg.n_expert
        counts = torch.bincount(expert.flatten(), minlength=E)  # (E,) assignments each expert was asked for
        load = counts.float() / expert.numel()  # (E,) f_e, sums to 1
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
        return load

    def within_capacity(self, expert):
        """Which of the (B*T, k) assignments fit: each expert takes at most capacity_factor * B*T * k / E.
        As in GShard, every token's first choice queues before any second choice, each in token
        order (batch-major). So a later token's first choice can push out an earlier token's
        second choice, and sequence 0 fills the queues before sequence 1: an output depends on
        later positions and on other sequences. The capacity also depends on B*T, so a prefix, or
        one decoding step, drops differently from the full sequence. Not causal: for training only."""
        n_tok, k = expert.shape
        E = self.cfg.n_expert
        capacity = math.ceil(self.cfg.capacity_factor * n_tok * k / E)
        queue = F.one_hot(expert.t().reshape(-1), E)  # (k*B*T, E): slot-major
        place = (queue.cumsum(dim=0) * queue).sum(dim=-1) - 1  # (k*B*T,) place in its expert's queue
        return (place < capacity).view(k, n_tok).t()  # (B*T, k)

    def act(self, h):
        if self.cfg.ffn == "swiglu":
            gate, up = h.chunk(2, dim=-1)  # (M, F) each
            return F.silu(gate) * up
        return F.relu(h) if self.cfg.ffn == "relu" else F.gelu(h, approximate="tanh" if self.cfg.ffn == "gelu_tanh" else "none")

    def experts_loop(self, x, tok, expert, weight):
        """The readable path: for each expert, gather its tokens, run its feed-forward, add back weighted."""
        y = torch.zeros_like(x)  # (B*T, C)
        # With gradients every expert runs, even on no token, so that each weight gets a gradient (DDP
        # all-reduces them all); without (decoding, evaluation) only the experts some token chose.
        for e in range(self.cfg.n_expert) if torch.is_grad_enabled() else expert.unique().tolist():
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

    def stats(self):
        """From the last forward: the load share of every expert, max violation (max load / mean
        load - 1), load entropy / ln E (1 = uniform), experts that got no token, share of
        assignments dropped for capacity, mean top-1 router probability."""
        load = self.last["load"]  # (E,)
        entropy = -(load * load.clamp_min(1e-12).log()).sum() / math.log(len(load))
        return {"load": load.tolist(), "max_violation": (load.max() / load.mean() - 1).item(), "entropy": entropy.item(),
                "dead": int((load == 0).sum()), "dropped": self.last["dropped"].item(), "top1": self.last["top1"].item()}


class Block(nn.Module):
    def __init__(self, cfg, layer):
        super().__init__()
        self.prenorm = cfg.prenorm
        self.norm1, self.norm2 = make_norm(cfg, cfg.d_model), make_norm(cfg, cfg.d_model)
        self.attn = Attention(cfg)
        if layer % cfg.moe_every == cfg.moe_offset:
            self.ffn = MoE(cfg)
        else:
            self.ffn = SwiGLU(cfg) if cfg.ffn == "swiglu" else MLP(cfg)

    def forward(self, x, rope, cache, layer):
        if self.prenorm:  # x + f(norm(x)): the residual stream itself is never normalised
            x = x + self.attn(self.norm1(x), rope, cache, layer)
            return x + self.ffn(self.norm2(x))
        x = self.norm1(x + self.attn(x, rope, cache, layer))  # norm(x + f(x))
        return self.norm2(x + self.ffn(x))


# ----------------------------------------------------------------------------- the model


class Model(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        if cfg.pos == "learned":
            self.wpe = nn.Embedding(cfg.block_size, cfg.d_model)
        if cfg.pos == "sinusoidal":  # entries of RMS 1/sqrt(2) would drown embeddings of std 0.02: scaled to the
            # embeddings' init RMS (Vaswani et al. multiply the embeddings by sqrt(d_model)); results/positions.md
            emb_std = 0.02 if cfg.init == "gpt2" else 1.0  # init_weights: N(0, 0.02) or N(0, 1)
            self.register_buffer("sinusoids", sinusoids(cfg.block_size, cfg.d_model) * emb_std * math.sqrt(2), persistent=False)
        if cfg.pos == "rope":
            self.register_buffer("inv_freq", rope_frequencies(cfg), persistent=False)  # (D/2,)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, layer) for layer in range(cfg.n_layer))
        # post-norm already ends every block with a norm; pre-norm needs one before the head
        self.norm_f = make_norm(cfg, cfg.d_model) if cfg.prenorm else nn.Identity()
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        self.init_weights()
        self.aux = {}

    @torch.no_grad()
    def init_weights(self):
        """Two rules, chosen by cfg.init; biases start at zero in both.
        gpt2: every matrix N(0, 0.02), a tied head, and each residual branch's output layer (out_proj)
          scaled by 1/sqrt(2 * n_layer) since both branches of every layer add to the stream (Radford
          et al. 2019). 0.02 is a fixed number, tuned for GPT-2's width: at a small width the q.k
          scores start far too flat and carry almost no gradient.
        fan_in (the default): PyTorch's own defaults. Every matrix, the head included, is uniform in
          +-1/sqrt(fan_in) (LeCun et al. 1998), so a layer's output has the scale of its input at any
          width; embeddings are N(0, 1), the scale of the normalised stream they feed; the head is
          untied, since one matrix cannot be both a unit-scale embedding and a 1/sqrt(d_model) readout
          (tied, it keeps the readout's scale). No further depth scaling.
        The two compared: results/ladder.md (text) and results/mqar.md (recall)."""
        cfg = self.config
        for name, m in self.named_modules():
            if cfg.init == "fan_in" and isinstance(m, (nn.Linear, nn.Embedding)):
                m.reset_parameters()  # Linear: kaiming_uniform(a=sqrt(5)) = U(+-1/sqrt(fan_in)); Embedding: N(0, 1)
            if cfg.init == "gpt2" and isinstance(m, (nn.Linear, nn.Embedding)):
                depth = math.sqrt(2 * cfg.n_layer) if name.endswith("out_proj") else 1.0
                nn.init.normal_(m.weight, std=0.02 / depth)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
            if isinstance(m, MoE):  # the experts' stacked matrices, by the same rule as a dense feed-forward
                for w, fan_in in ((m.w_in, cfg.d_model), (m.w_out, cfg.d_expert)):
                    if cfg.init == "fan_in":
                        nn.init.uniform_(w, -fan_in ** -0.5, fan_in ** -0.5)
                    else:
                        nn.init.normal_(w, std=0.02 / (math.sqrt(2 * cfg.n_layer) if w is m.w_out else 1.0))

    def forward(self, idx, targets=None, cache=None):
        cfg = self.config
        B, T = idx.shape
        start = cache.len if cache is not None else 0
        if start + T > cfg.block_size:
            raise ValueError(f"sequence of {start + T} tokens is longer than block_size {cfg.block_size}")
        pos = torch.arange(start, start + T, device=idx.device)  # (T,)
        x = self.wte(idx)  # (B, T, C)
        if cfg.pos == "learned":
            x = x + self.wpe(pos)
        if cfg.pos == "sinusoidal":
            x = x + self.sinusoids[pos]
        x = self.drop(x)
        rope = self.rope(pos) if cfg.pos == "rope" else None
        for layer, block in enumerate(self.blocks):
            x = block(x, rope, cache, layer)
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

    def rope(self, pos):
        """(cos, sin) of the rotation angles at positions pos (T,), each (T, 1, D/2). Position
        interpolation squeezes rope_factor x more positions into the trained range of angles. YaRN's
        temperature multiplies q and k by 0.1 ln(s) + 1 (the paper's sqrt(1/t)), so the scores by its square."""
        cfg = self.config
        pos = pos.float() / cfg.rope_factor if cfg.rope_scaling == "pi" else pos.float()
        angle = (pos[:, None] * self.inv_freq)[:, None, :]  # (T, 1, D/2)
        m = 0.1 * math.log(cfg.rope_factor) + 1 if cfg.rope_scaling == "yarn" and cfg.rope_factor > 1 else 1.0
        return angle.cos() * m, angle.sin() * m

    # ------------------------------------------------------------------------- generation

    def new_cache(self, batch_size, max_len=None, device=None, dtype=None):
        cfg = self.config
        p = self.wte.weight
        return KVCache(cfg.n_layer, batch_size, cfg.n_kv_head, max_len or cfg.block_size, cfg.head_dim,
                       device or p.device, dtype or p.dtype)

    def cache_bytes(self, cache):
        return cache.k.nbytes + cache.v.nbytes

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None):
        """Yield (B, 1) new tokens: the prompt goes through in one parallel pass that fills the KV
        cache, then each step feeds only the newest token. When the context reaches block_size,
        the window slides: the cache is rebuilt from the most recent half of it."""
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
        """Training FLOPs per token, PaLM's convention: 6 per weight in a matrix multiply (2 forward,
        4 backward) plus the attention scores and weighted sum, 12 * layers * heads * D * context."""
        cfg = self.config
        matmul = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
        matmul += sum(m.cfg.top_k * m.num_expert_params() for m in self.modules() if isinstance(m, MoE))  # active only
        return 6 * matmul + 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * cfg.block_size

    def optim_groups(self, weight_decay):
        """Matrices decay; vectors (norm gains, biases) and anything marked _no_weight_decay do not."""
        decays = {p: p.dim() >= 2 and not getattr(p, "_no_weight_decay", False) for p in self.parameters()}
        return [{"params": [p for p, d in decays.items() if d], "weight_decay": weight_decay},
                {"params": [p for p, d in decays.items() if not d], "weight_decay": 0.0}]

    def summary(self):
        cfg = self.config
        kind = "MHA" if cfg.n_kv_head == cfg.n_head else "MQA" if cfg.n_kv_head == 1 else "GQA"
        return (f"{cfg.n_layer} layers, {kind} ({cfg.n_head} query / {cfg.n_kv_head} K/V heads of {cfg.head_dim}), "
                f"{cfg.pos} positions, {cfg.ffn} {cfg.d_ff}, {cfg.norm} {'pre' if cfg.prenorm else 'post'}-norm"
                f"; MoE in layers {[i for i, b in enumerate(self.blocks) if isinstance(b.ffn, MoE)]}: "
                f"top-{cfg.top_k} of {cfg.n_expert} experts of {cfg.d_expert}"
                f"{f' + {cfg.n_shared} shared' if cfg.n_shared else ''}, {cfg.router} router, "
                f"{f'capacity factor {cfg.capacity_factor}' if cfg.capacity_factor else 'dropless'}, {cfg.expert_path} path")

    def layer_stats(self):
        """MoE.stats of every MoE layer that has run."""
        return [m.stats() for m in self.modules() if isinstance(m, MoE) and m.last is not None]

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
