"""
A GPT-style decoder-only Transformer, with every variant of the course behind a config flag.

Each layer is self-attention followed by a position-wise feed-forward network, each wrapped in
a residual connection and a normalisation (Vaswani et al. 2017, "Attention Is All You Need";
GPT-2, Radford et al. 2019). The switches:

  attention   n_kv_head = n_head is multi-head attention (MHA), 1 is multi-query attention
              (MQA, Shazeer 2019), anything between is grouped-query attention (GQA, Ainslie
              et al. 2023): groups of query heads share one key/value head, which shrinks the
              KV cache by n_head / n_kv_head.
              flash=True calls kernels.attention (tiled, never builds the T x T matrix);
              flash=False runs the formula softmax(QK^T / sqrt(d) + mask) V step by step.
              attn_scale: the 1/sqrt(d) of that formula keeps the scores of unit-variance q and k
              at unit variance whatever d (Vaswani et al.); "one" leaves it out, so the scores grow
              with d and the softmax saturates; "dim" is muP's 1/d (Yang et al. 2022).
  positions   learned absolute (GPT-2), sinusoidal absolute (Vaswani), RoPE (Su et al. 2021:
              rotate q and k by an angle proportional to position), ALiBi (Press et al. 2021:
              a per-head linear penalty on distance added to the scores), or none.
              RoPE reaches past the trained length without retraining by rescaling its angles
              at evaluation: position interpolation (PI, Chen et al. 2023) divides positions by
              rope_factor; NTK-aware scaling raises the base instead, so the fast (local) rotations
              stay as trained and only the slow ones are stretched (bloc97 2023); YaRN (Peng et al. 2023)
              sorts the pairs by how many turns they make within the trained length: many, kept as
              trained; under one, interpolated as PI; between, a linear ramp ("NTK-by-parts"); and it
              sharpens the softmax, whose entropy grows with length, by scaling q and k.
  ffn         ReLU MLP (the original Transformer), GELU MLP (GPT-2, which used GELU's tanh
              approximation: gelu_tanh), both with 4x hidden size, or
              SwiGLU (Shazeer 2020; LLaMA), whose three matrices get a hidden size of about 8/3
              d_model so the parameter count matches.
  norm        LayerNorm or RMSNorm (Zhang & Sennrich 2019); pre-norm (GPT-2 onwards, norm
              inside the residual branch) or post-norm (the original paper, norm after the add).

The defaults are the modern recipe: RoPE, RMSNorm, pre-norm, SwiGLU, GQA.

Shapes: B batch, T time (tokens in this call), S cached + new tokens, C d_model,
H query heads, G key/value heads (the groups of GQA), D head dim, F feed-forward hidden size, V vocabulary.
"""
import math
from dataclasses import dataclass
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


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.prenorm = cfg.prenorm
        self.norm1, self.norm2 = make_norm(cfg, cfg.d_model), make_norm(cfg, cfg.d_model)
        self.attn = Attention(cfg)
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
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
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
        return sum(p.numel() for p in self.parameters())  # a dense model uses all of them per token

    def flops_per_token(self):
        """Training FLOPs per token, PaLM's convention: 6 per weight in a matrix multiply (2 forward,
        4 backward) plus the attention scores and weighted sum, 12 * layers * heads * D * context."""
        cfg = self.config
        matmul = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
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
                f"{cfg.pos} positions, {cfg.ffn} {cfg.d_ff}, {cfg.norm} {'pre' if cfg.prenorm else 'post'}-norm")

    def stats(self):
        return {}


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
