"""
Hybrids of attention and Mamba layers with Mixture-of-Experts feed-forwards: Jamba (Lieber et al.
2024, "Jamba: A Hybrid Transformer-Mamba Language Model", arXiv 2403.19887), and Zamba's shared
attention block (Glorioso et al. 2024, "Zamba: A Compact 7B SSM Hybrid Model", arXiv 2405.16712).
The blocks are those of model_transformer.py, model_mamba.py and model_moe.py, cut to what a
hybrid uses; what this file adds is how they interleave.

Attention recalls any earlier token exactly, but its KV cache grows with every token. A Mamba layer
compresses the past into a fixed-size state: cheap at any length, but lossy, weaker at copying and
recall. A hybrid keeps a few attention layers for recall and makes the rest Mamba, so the KV cache
shrinks by the share of Mamba layers (with one attention layer in eight, to 1/8 of a Transformer's).

  layers    one word per layer: A (attention) or M (Mamba), then d (dense SwiGLU feed-forward),
            e (mixture of experts) or nothing. Jamba's block: "Md Me Md Me Ad Me Md Me".
            No position encoding: Jamba found that the Mamba layers tell attention the order.
  Mamba     with RMSNorm on dt, B and C before the scan, which Jamba added because large
            activations there made the loss spike at scale (inner_norm=False: without).
  MoE       a softmax router sends each token to top_k of n_expert SwiGLU experts (Shazeer et al.
            2017), weighted by their softmax probabilities as Jamba does (norm_topk=True renormalises
            the k weights to sum to 1, as Mixtral does); dropless; Switch's balance loss and
            ST-MoE's z-loss. Jamba: 16 experts, top-2, each as wide as the dense feed-forward, so
            an MoE layer costs two dense feed-forwards per token. Here d_expert defaults to
            d_ff / top_k: an MoE layer costs one (plus the router), and the experts add
            parameters, not compute; d_expert = d_ff gives Jamba's cost. The defaults (top-2 of
            8, d_model 64, context 64) are sized to train on a CPU in minutes.
  S         Zamba's shared block: ONE attention + SwiGLU block whose weights serve every S in the
            pattern (Zamba 7B: after every 6 Mamba layers, e.g. "M M M S M M M S"). It reads
            [stream, token embeddings] concatenated; each use has its own KV cache and its own
            C x C output projection. Simplified: the attention heads are C / H wide (Zamba's 2C / H),
            and the output joins the stream, where Zamba adds it only to the next Mamba layer's input.
            So a Zamba checkpoint does not load into S (test_models.py shows both places against
            transformers' Zamba); Jamba's do (pretrained.py), and give its logits.

Shapes: B batch, T time (tokens in this call), S cached + new tokens, C d_model, V vocabulary;
attention: H query heads, G key/value heads (the groups of GQA), D head dim; feed-forward: F hidden size of a SwiGLU
(d_ff, or d_expert in an expert), E experts, k experts per token (top_k); Mamba: I d_inner
(expand * C), N state size, R dt_rank, W d_conv (taps of the convolution). (In `layers`, S is
the shared block; in shapes, S is a length.)
"""
import math
from dataclasses import dataclass, replace

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
    block_size: int = 64  # longest context; the KV cache holds this many positions (small: CPU-sized defaults)
    d_model: int = 64
    layers: str = "Md Me Md Me Ad Me Md Me"  # A attention | M Mamba, then d dense | e MoE | nothing; or S shared
    # attention (A and S)
    n_head: int = 4
    n_kv_head: int = 2  # n_head: MHA, 1: MQA, between: GQA
    attn_scale: str = "sqrt"  # the scores' scale: sqrt 1/sqrt(head_dim) | one 1 | dim 1/head_dim (muP)
    # Mamba (M)
    d_state: int = 16  # N, the size of each channel's hidden state
    d_conv: int = 4  # taps of the causal depthwise convolution
    expand: int = 2  # d_inner = expand * d_model
    dt_rank: int = 0  # rank of the projection that makes dt; 0 picks ceil(d_model / 16)
    dt_min: float = 1e-3  # dt is initialised log-uniform in [dt_min, dt_max]
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    inner_norm: bool = True  # RMSNorm on dt, B and C (Jamba)
    scan: str = "auto"  # auto (Triton on CUDA, chunked elsewhere) | chunked | triton | ref
    # feed-forward (d, e and inside S)
    d_ff: int = 0  # SwiGLU hidden size; 0 picks about 8/3 d_model (the parameters of a 4x GELU MLP)
    n_expert: int = 8  # Jamba: 16 (8 keeps the CPU default within minutes)
    top_k: int = 2
    d_expert: int = 0  # one expert's hidden size; 0 picks d_ff // top_k (Jamba's are d_ff wide)
    norm_topk: bool = False  # renormalise the k chosen weights to sum to 1 (Mixtral); Jamba keeps them as they are
    balance_coef: float = 0.01  # Switch load-balancing loss
    z_coef: float = 0.001  # router z-loss
    # everywhere
    bias: bool = False  # biases in linear layers
    dropout: float = 0.0  # on embeddings and residual branches
    tie_embeddings: bool = False  # True: the output head reuses the token embedding matrix
    norm_eps: float = 1e-5

    def __post_init__(self):  # one line per rule: an impossible value fails here, before any weight is made
        words = self.layers.split()
        bad = [w for w in words if not (w == "S" or (w[0] in "AM" and w[1:] in ("", "d", "e")))]
        check(words and not bad, f"layers={self.layers!r}: {f'{bad[0]!r} is not a layer' if bad else 'no layers'}; each word is "
              f"A (attention) or M (Mamba), then d (dense), e (experts) or nothing; or S (the shared attention block)")
        for name in ("vocab_size", "block_size", "d_model", "n_head", "n_kv_head", "d_state", "d_conv", "expand", "dt_init_floor",
                     "n_expert", "top_k"):
            check(getattr(self, name) > 0, f"{name} must be positive, got {getattr(self, name)}")
        check(self.n_head % self.n_kv_head == 0, f"n_head ({self.n_head}) must be divisible by n_kv_head ({self.n_kv_head})")
        check(self.d_model % self.n_head == 0, f"d_model ({self.d_model}) must be divisible by n_head ({self.n_head})")
        check(0 < self.dt_min <= self.dt_max, f"need 0 < dt_min <= dt_max, got {self.dt_min}, {self.dt_max}")
        check(self.scan in ("auto", "chunked", "triton", "ref"), f"scan must be one of auto|chunked|triton|ref, got {self.scan!r}")
        check(self.attn_scale in ("sqrt", "one", "dim"), f"attn_scale must be one of sqrt|one|dim, got {self.attn_scale!r}")
        check(self.top_k <= self.n_expert, f"top_k must be between 1 and n_expert ({self.n_expert}), got {self.top_k}")
        check(min(self.d_ff, self.d_expert, self.dt_rank) >= 0, "d_ff, d_expert and dt_rank must be >= 0 (0 for the default)")
        check(0 <= self.dropout < 1, f"dropout must be in [0, 1), got {self.dropout}")
        self.layers, self.n_layer = " ".join(words), len(words)
        self.n_attn = sum(w[0] in "AS" for w in words)  # attention uses, each with its own KV cache
        self.head_dim = self.d_model // self.n_head
        self.d_ff = self.d_ff or 8 * math.ceil(8 * self.d_model / 3 / 8)  # 3 * C * F = 2 * C * 4C
        self.d_expert = self.d_expert or max(1, self.d_ff // self.top_k)  # top_k experts = one dense feed-forward
        self.d_inner = self.expand * self.d_model
        self.dt_rank = self.dt_rank or math.ceil(self.d_model / 16)


# ----------------------------------------------------------------------------- small blocks


class RMSNorm(nn.Module):
    """x / rms(x) * g: LayerNorm without the mean subtraction and the bias. Computed in float32."""

    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.rms_norm(x.float(), (x.size(-1),), self.weight.float(), self.eps).type_as(x)


class HybridCache:
    """What generation carries. Per attention use (A or S): the keys and values so far, of n_kv_head
    heads, not n_head (the saving of GQA). Per Mamba layer: the conv's last d_conv - 1 inputs and the
    scan state, a fixed size. A layer finds its own by its place among its kind (Model.cache_index)."""

    def __init__(self, cfg, batch_size, max_len, device, dtype):
        n_mamba = cfg.n_layer - cfg.n_attn
        self.k = torch.zeros(cfg.n_attn, batch_size, cfg.n_kv_head, max_len, cfg.head_dim, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.conv = torch.zeros(n_mamba, batch_size, cfg.d_inner, cfg.d_conv - 1, device=device, dtype=dtype)
        self.ssm = torch.zeros(n_mamba, batch_size, cfg.d_inner, cfg.d_state, device=device, dtype=torch.float32)
        self.len = 0  # tokens seen; the model advances it after each forward

    def update(self, layer, k, v):
        """Append this call's k, v (B, G, T, D); return everything so far (B, G, S, D)."""
        end = self.len + k.size(2)
        self.k[layer, :, :, self.len:end] = k
        self.v[layer, :, :, self.len:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


# ----------------------------------------------------------------------------- the layers


class Attention(nn.Module):
    """model_transformer's GQA attention, without positions (none here, as in Jamba). d_in is 2C in
    Zamba's shared block."""

    def __init__(self, cfg, d_in):
        super().__init__()
        self.cfg = cfg
        H, G, D = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.qkv = nn.Linear(d_in, (H + 2 * G) * D, bias=cfg.bias)
        self.out_proj = nn.Linear(H * D, cfg.d_model, bias=cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)
        self.scale = {"sqrt": 1 / math.sqrt(D), "one": 1.0, "dim": 1 / D}[cfg.attn_scale]

    def forward(self, x, cache, layer):
        cfg = self.cfg
        B, T, _ = x.shape
        H, G, D = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        q, k, v = self.qkv(x).view(B, T, H + 2 * G, D).transpose(1, 2).split([H, G, G], dim=1)  # (B, H|G|G, T, D)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, G, S, D)
        y = kernels.attention(q, k, v, causal=True, scale=self.scale)  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, H * D)  # (B, T, H*D)
        return self.drop(self.out_proj(y))


class MambaLayer(nn.Module):
    """model_mamba's layer: in_proj -> (causal conv -> SiLU -> selective scan) * SiLU(z) -> out_proj,
    plus Jamba's RMSNorm on dt, B and C."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        I, N, R = cfg.d_inner, cfg.d_state, cfg.dt_rank
        self.in_proj = nn.Linear(cfg.d_model, 2 * I, bias=cfg.bias)
        self.conv1d = nn.Conv1d(I, I, cfg.d_conv, groups=I)  # depthwise; padded by hand
        self.x_proj = nn.Linear(I, R + 2 * N, bias=False)  # dt (low rank), B and C from the input
        if cfg.inner_norm:  # Jamba: dt, B and C at a fixed scale, whatever x_proj learns
            self.dt_norm, self.B_norm, self.C_norm = (RMSNorm(n, cfg.norm_eps) for n in (R, N, N))
        self.dt_proj = nn.Linear(R, I, bias=True)
        self.A_log = nn.Parameter(torch.empty(I, N))
        self.D = nn.Parameter(torch.empty(I))
        self.A_log._no_weight_decay = True  # decay would pull A towards -1 and D towards 0
        self.D._no_weight_decay = True
        self.out_proj = nn.Linear(I, cfg.d_model, bias=cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)

    @torch.no_grad()
    def reset_ssm_parameters(self):
        """The official code's initialisation; the model calls it after its generic init."""
        cfg = self.cfg
        I, N, R = cfg.d_inner, cfg.d_state, cfg.dt_rank
        nn.init.uniform_(self.dt_proj.weight, -R ** -0.5, R ** -0.5)
        # dt = softplus(dt_proj(...) + bias) starts log-uniform in [dt_min, dt_max]: the bias
        # is the inverse softplus of such a dt, log(exp(dt) - 1) = dt + log(1 - exp(-dt))
        dt = torch.exp(torch.rand(I) * (math.log(cfg.dt_max) - math.log(cfg.dt_min)) + math.log(cfg.dt_min))
        dt = dt.clamp(min=cfg.dt_init_floor)
        self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        # S4D-real: A = -(1, 2, ..., N) in every channel, stored as log(-A) so that A stays negative
        self.A_log.copy_(torch.log(torch.arange(1, N + 1, dtype=torch.float32)).repeat(I, 1))  # (I, N)
        self.D.fill_(1.0)

    def forward(self, x, cache, layer):
        cfg = self.cfg
        B, T, _ = x.shape
        R, N, W = cfg.dt_rank, cfg.d_state, cfg.d_conv
        x, z = self.in_proj(x).transpose(1, 2).chunk(2, dim=1)  # (B, I, T) each
        # causal convolution: the W - 1 inputs before this chunk are zeros or come from the cache
        past = F.pad(x, (W - 1, 0))[..., :W - 1] if cache is None else cache.conv[layer]  # (B, I, W-1)
        x_full = torch.cat((past.to(x.dtype), x), dim=-1)  # (B, I, W-1+T)
        if cache is not None:
            cache.conv[layer] = x_full[..., x_full.size(-1) - (W - 1):]  # the last W-1 inputs (none if W = 1)
        x = F.silu(self.conv1d(x_full))  # (B, I, T)
        dt, Bm, Cm = self.x_proj(x.transpose(1, 2)).split([R, N, N], dim=-1)  # (B, T, R), (B, T, N) x2
        if cfg.inner_norm:  # large activations here made Jamba's loss spike; normalised, they cannot grow
            dt, Bm, Cm = self.dt_norm(dt), self.B_norm(Bm), self.C_norm(Cm)
        dt = (dt @ self.dt_proj.weight.t()).transpose(1, 2)  # (B, I, T); the bias goes in the scan
        Bm, Cm = Bm.transpose(1, 2), Cm.transpose(1, 2)  # (B, N, T)
        A = -torch.exp(self.A_log.float())  # (I, N)
        if cache is not None and T == 1:  # decoding: one step of the recurrence
            y, cache.ssm[layer] = kernels.selective_state_update(
                cache.ssm[layer], x[..., 0], dt[..., 0], A, Bm[..., 0], Cm[..., 0], self.D.float(), z[..., 0],
                dt_bias=self.dt_proj.bias.float(), dt_softplus=True)
            y = y[..., None]  # (B, I, 1)
        else:
            y = kernels.selective_scan(x, dt, A, Bm, Cm, self.D.float(), z, delta_bias=self.dt_proj.bias.float(),
                                       delta_softplus=True, initial_state=None if cache is None else cache.ssm[layer],
                                       return_last_state=cache is not None,
                                       impl=None if cfg.scan == "auto" else cfg.scan)  # (B, I, T)
            if cache is not None:
                y, cache.ssm[layer] = y
        return self.drop(self.out_proj(y.transpose(1, 2)))  # (B, T, C)


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


class MoE(nn.Module):
    """n_expert SwiGLU experts of width d_expert; a softmax router sends each token to top_k of
    them and weights their outputs by the router's probabilities (norm_topk: renormalised to sum
    to 1). Dropless: every token reaches its experts, so no token's output depends on another's and
    the model stays causal."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.router = nn.Linear(cfg.d_model, cfg.n_expert, bias=False)  # random init, never zero (ties)
        self.experts = nn.ModuleList(SwiGLU(replace(cfg, d_ff=cfg.d_expert)) for _ in range(cfg.n_expert))
        self.losses = None  # (balance, z) of the last forward, for Model.forward to add to the loss
        self.last = None  # (load per expert, top-1 probability) of the last forward, for Model.stats

    def forward(self, x):
        B, T, C = x.shape
        E, k = self.cfg.n_expert, self.cfg.top_k
        x = x.reshape(B * T, C)  # (B*T, C): routing is per token
        with torch.autocast(x.device.type, enabled=False):  # float32 under autocast: rounding must not flip a choice
            logits = F.linear(x.float(), self.router.weight.float())  # (B*T, E)
        probs = logits.softmax(dim=-1)  # (B*T, E)
        weight, expert = probs.topk(k, dim=-1)  # (B*T, k) each: k distinct experts per token
        if self.cfg.norm_topk:
            weight = weight / weight.sum(dim=-1, keepdim=True)
        y = torch.zeros_like(x)  # (B*T, C)
        # With gradients every expert runs, even on no token, so that each weight gets a gradient (DDP
        # all-reduces them all); without (decoding, evaluation) only the experts some token chose.
        for e in range(E) if torch.is_grad_enabled() else expert.unique().tolist():
            tok, slot = torch.where(expert == e)  # the tokens routed to e, and which of their k choices it is
            y = y.index_add(0, tok, (self.experts[e](x[tok]) * weight[tok, slot, None]).type_as(x))
        load = torch.bincount(expert.flatten(), minlength=E).float() / expert.numel()  # (E,) f_e, sums to 1
        balance = E * (load * probs.mean(dim=0)).sum()  # Switch: 1 when balanced; the gradient flows through P_e
        self.losses = (balance, torch.logsumexp(logits, dim=-1).square().mean())  # z-loss keeps the logits small
        self.last = (load.detach(), probs.max(dim=-1).values.mean().detach())
        return y.view(B, T, C)


class SharedBlock(nn.Module):
    """Zamba's shared attention + SwiGLU block. It reads [stream, embeddings]: every use sees the tokens
    themselves, however far the stream has moved from them."""

    def __init__(self, cfg):
        super().__init__()
        self.norm1, self.norm2 = RMSNorm(2 * cfg.d_model, cfg.norm_eps), RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg, 2 * cfg.d_model)
        self.ffn = SwiGLU(cfg)

    def forward(self, x, x0, cache, layer):
        h = self.attn(self.norm1(torch.cat((x, x0), dim=-1)), cache, layer)  # (B, T, 2C) -> (B, T, C)
        return self.ffn(self.norm2(h))


class Block(nn.Module):
    """One word of the pattern. A, M: x + mixer(norm(x)), then x + ffn(norm(x)) if the word has a
    feed-forward. S: x + out_proj(shared(x, embeddings)), with the same SharedBlock at every S."""

    def __init__(self, cfg, word, shared):
        super().__init__()
        self.kind, self.ffn = word[0], None
        if self.kind == "S":
            self.shared = shared  # one module at several depths: one set of weights, counted once
            self.out_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)  # this depth's own
            return
        self.norm1 = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mixer = Attention(cfg, cfg.d_model) if self.kind == "A" else MambaLayer(cfg)
        if word[1:]:
            self.norm2 = RMSNorm(cfg.d_model, cfg.norm_eps)
            self.ffn = MoE(cfg) if word[1] == "e" else SwiGLU(cfg)

    def forward(self, x, x0, cache, index):
        """index: the layer's place among the attention uses, or among the Mamba layers."""
        if self.kind == "S":
            return x + self.out_proj(self.shared(x, x0, cache, index))
        x = x + self.mixer(self.norm1(x), cache, index)
        return x if self.ffn is None else x + self.ffn(self.norm2(x))


# ----------------------------------------------------------------------------- the model


class Model(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        words = cfg.layers.split()
        shared = SharedBlock(cfg) if "S" in words else None
        self.blocks = nn.ModuleList(Block(cfg, word, shared) for word in words)
        attn = [w[0] in "AS" for w in words]  # where each layer's state lives: its place among its kind
        self.cache_index = [attn[:i].count(a) for i, a in enumerate(attn)]
        self.norm_f = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        self.init_weights()
        self.aux = {}

    @torch.no_grad()
    def init_weights(self):
        """model_transformer.py's default rule (its init_weights says why): PyTorch's defaults, every
        matrix uniform in +-1/sqrt(fan_in), embeddings N(0, 1), an untied head, biases zero; then the
        Mamba layers' dt, A and D as the official code sets them (reset_ssm_parameters)."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding, nn.Conv1d)):
                m.reset_parameters()
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        for m in self.modules():  # after the loop above, which zeroed dt_proj's bias
            if isinstance(m, MambaLayer):
                m.reset_ssm_parameters()

    def forward(self, idx, targets=None, cache=None):
        cfg = self.config
        B, T = idx.shape
        start = cache.len if cache is not None else 0
        if start + T > cfg.block_size:
            raise ValueError(f"sequence of {start + T} tokens is longer than block_size {cfg.block_size}")
        x = x0 = self.drop(self.wte(idx))  # (B, T, C); x0 stays the embeddings, for S
        for block, index in zip(self.blocks, self.cache_index):
            x = block(x, x0, cache, index)
        if cache is not None:
            cache.len += T
        logits = self.lm_head(self.norm_f(x)).float()  # (B, T, V)
        loss = None
        if targets is not None:  # targets of -1 are ignored (the synthetic tasks score answers only)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
            self.aux = {"ce": loss.detach()}
            moes = [m for m in self.modules() if isinstance(m, MoE)]
            if moes:  # per layer, averaged: balance reads 1.0 at perfect balance whatever the depth
                balance = torch.stack([m.losses[0] for m in moes]).mean()
                z = torch.stack([m.losses[1] for m in moes]).mean()
                loss = loss + cfg.balance_coef * balance + cfg.z_coef * z
                self.aux.update(balance=balance.detach(), z=z.detach())
        return logits, loss

    # ------------------------------------------------------------------------- generation

    def new_cache(self, batch_size, max_len=None, device=None, dtype=None):
        cfg, p = self.config, self.wte.weight
        return HybridCache(cfg, batch_size, max_len or cfg.block_size, device or p.device, dtype or p.dtype)

    def cache_bytes(self, cache):
        return cache.k.nbytes + cache.v.nbytes + cache.conv.nbytes + cache.ssm.nbytes

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None):
        """Yield (B, 1) new tokens: the prompt goes through in one parallel pass that fills the cache
        (keys and values, Mamba states), then each step feeds only the newest token. When the context
        reaches block_size, the window slides: the cache is rebuilt from the most recent half of it."""
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
        n = sum(p.numel() for p in self.parameters())  # a shared (or tied) weight counts once
        if active:  # per token, only top_k of the n_expert experts of each MoE layer run
            n -= sum((m.cfg.n_expert - m.cfg.top_k) * sum(p.numel() for p in m.experts[0].parameters())
                     for m in self.modules() if isinstance(m, MoE))
        return n

    def flops_per_token(self):
        """Training FLOPs per token: 6 per weight in a matrix multiply or the convolution (2 forward,
        4 backward), a shared block's weights at every use, only the top_k experts of a MoE; plus, per
        attention use, the scores and weighted sum (12 * H * D * context), per Mamba layer the scan
        (27 * I * N)."""
        cfg = self.config
        weights = lambda mod: sum(m.weight.numel() for m in mod.modules() if isinstance(m, (nn.Linear, nn.Conv1d)))
        n = self.lm_head.weight.numel()
        for block in self.blocks:
            n += weights(block)
            if isinstance(block.ffn, MoE):
                n -= (cfg.n_expert - cfg.top_k) * weights(block.ffn.experts[0])
        return (6 * n + 12 * cfg.n_attn * cfg.n_head * cfg.head_dim * cfg.block_size
                + 27 * (cfg.n_layer - cfg.n_attn) * cfg.d_inner * cfg.d_state)

    def optim_groups(self, weight_decay):
        """Matrices decay; vectors (norm gains, biases) and anything marked _no_weight_decay do not."""
        decays = {p: p.dim() >= 2 and not getattr(p, "_no_weight_decay", False) for p in self.parameters()}
        return [{"params": [p for p, d in decays.items() if d], "weight_decay": weight_decay},
                {"params": [p for p, d in decays.items() if not d], "weight_decay": 0.0}]

    def summary(self):
        cfg = self.config
        kind = "MHA" if cfg.n_kv_head == cfg.n_head else "MQA" if cfg.n_kv_head == 1 else "GQA"
        return (f"layers {cfg.layers} (A attention, M Mamba, S shared attention; d dense, e MoE feed-forward); "
                f"{kind} ({cfg.n_head} query / {cfg.n_kv_head} K/V heads of {cfg.head_dim}), no positions; "
                f"Mamba d_inner {cfg.d_inner}, state {cfg.d_state}, {'with' if cfg.inner_norm else 'no'} dt/B/C norm; "
                f"top-{cfg.top_k} of {cfg.n_expert} experts of {cfg.d_expert}, dense swiglu {cfg.d_ff}")

    def stats(self):
        """Routing in the last forward, mean over the MoE layers: moe_vio max load / mean load - 1 (0 when
        balanced), moe_ent load entropy / ln E (1 = uniform), moe_dead experts that got no token, moe_top1
        the top-1 router probability."""
        last = [m.last for m in self.modules() if isinstance(m, MoE) and m.last is not None]
        if not last:
            return {}
        load = torch.stack([f for f, _ in last])  # (MoE layers, E)
        E = load.size(1)
        entropy = -(load * load.clamp_min(1e-12).log()).sum(-1) / math.log(E)  # (MoE layers,)
        return {"moe_vio": (load.max(-1).values * E - 1).mean().item(), "moe_ent": entropy.mean().item(),
                "moe_dead": (load == 0).sum(-1).float().mean().item(),
                "moe_top1": torch.stack([p for _, p in last]).mean().item()}


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
