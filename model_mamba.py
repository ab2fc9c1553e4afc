"""
A Mamba language model: a stack of selective state space (S6) layers, no attention at all
(Gu & Dao 2023, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces").

Each layer runs, for every one of d_inner channels, a linear recurrence over time with an
N-dimensional hidden state (a state space model, discretised with step size dt):
    h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t        y_t = C_t h_t + D x_t
What makes it *selective* is that dt, B and C are computed from the input at every position,
so the layer can decide what to write into its state and what to forget: a large dt resets
the state towards the current input, a small one keeps the past. A is diagonal and negative
(exp(dt A) is a decay), initialised to -(1, 2, ..., N) as in S4D-real. selective="none" makes
dt, B and C learned constants instead (dt one per channel, B and C one per state entry, S4D's
init B = 1, C ~ N(0, 1)): a linear time-invariant (LTI) layer, S4D in the same block, which is
the ablation of the paper's Table 1; "dt" keeps only dt selective, "bc" only B and C.

The Mamba block around the scan: in_proj widens d_model to two streams of d_inner =
expand * d_model; one goes through a short causal depthwise convolution (d_conv taps) and a
SiLU, then the selective scan; the other, z, gates the result through SiLU(z); out_proj goes
back to d_model. Blocks are pre-RMSNorm residual, as in the Transformer.

Training runs the scan over the whole sequence in one call (kernels.selective_scan: a Triton
kernel on the GPU, a chunked scan on the CPU); scan="loop" runs selective_scan_loop instead, the
recurrence above written out one time step after another, to read and to test the kernels by.
Generation keeps, per layer, the last d_conv - 1 inputs of the convolution and the scan state h:
a fixed-size cache, whatever the length of the context, where a Transformer's KV cache grows
with every token. The prompt goes through the full-sequence scan, which also returns those
states, and each new token is a single step of the recurrence (kernels.selective_state_update).

Shapes: B batch, T time (tokens in this call), C d_model, I d_inner (expand * C), N state
size, R dt_rank, W d_conv (taps of the convolution), V vocabulary.
"""
import math
from dataclasses import dataclass

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
    block_size: int = 256  # training context; generation is not limited by it (the state has a fixed size)
    d_model: int = 128
    n_layer: int = 4
    d_state: int = 16  # N, the size of each channel's hidden state
    d_conv: int = 4  # taps of the causal depthwise convolution
    expand: int = 2  # d_inner = expand * d_model
    dt_rank: int = 0  # rank of the projection that makes dt; 0 picks ceil(d_model / 16)
    dt_min: float = 1e-3  # dt is initialised log-uniform in [dt_min, dt_max]
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    conv_bias: bool = True
    bias: bool = False  # biases in in_proj and out_proj
    dropout: float = 0.0  # on embeddings and residual branches
    tie_embeddings: bool = False  # True: the head reuses the embedding, as the official model does (init_weights)
    norm_eps: float = 1e-5
    scan: str = "auto"  # auto (Triton on CUDA, chunked elsewhere) | chunked | triton | ref | loop (selective_scan_loop)
    selective: str = "all"  # what depends on the input: all (dt, B, C: Mamba) | dt | bc | none (an LTI layer, S4D)

    def __post_init__(self):  # one line per rule: an impossible value fails here, before any weight is made
        for name in ("vocab_size", "block_size", "d_model", "n_layer", "d_state", "d_conv", "expand", "dt_init_floor", "norm_eps"):
            check(getattr(self, name) > 0, f"{name} must be positive, got {getattr(self, name)}")
        check(self.dt_rank >= 0, f"dt_rank must be positive (or 0 for the default), got {self.dt_rank}")
        check(0 < self.dt_min <= self.dt_max, f"need 0 < dt_min <= dt_max, got {self.dt_min}, {self.dt_max}")
        check(0 <= self.dropout < 1, f"dropout must be in [0, 1), got {self.dropout}")
        check(self.scan in ("auto", "chunked", "triton", "ref", "loop"), f"scan must be one of auto|chunked|triton|ref|loop, got {self.scan!r}")
        check(self.selective in ("all", "dt", "bc", "none"), f"selective must be one of all|dt|bc|none, got {self.selective!r}")
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


class MambaCache:
    """What generation carries from token to token, for all layers: the convolution's last
    W - 1 inputs and the scan state. Its size does not depend on the context length."""

    def __init__(self, n_layer, batch_size, d_inner, d_conv, d_state, device, dtype):
        self.conv = torch.zeros(n_layer, batch_size, d_inner, d_conv - 1, device=device, dtype=dtype)
        self.ssm = torch.zeros(n_layer, batch_size, d_inner, d_state, device=device, dtype=torch.float32)
        self.len = 0  # tokens seen; the model advances it after each forward


def selective_scan_loop(x, dt, A, Bm, Cm, D, z, dt_bias, h=None):
    """The selective scan as the recurrence of the paper, one time step after another; the same
    result as kernels.selective_scan, which computes it fast (the tests hold the two equal).
    Glossary, the paper's symbols on the left:
        x   x (B, I, T)     the input of each of the I channels      h  h (B, I, N)  the state
        Δ   softplus(dt + dt_bias) (B, I, T): a step size per channel and position, > 0
        A   A (I, N)        diagonal and negative, the same at every position
        B   Bm (B, N, T)    C  Cm (B, N, T): from the input (constants, selective="none"), shared by the I channels
        D   D (I,)          a skip connection from x straight to y
        y   the output (B, I, T), gated by SiLU(z) as in the Mamba block
    A is discretised exactly (zero-order hold, exp(Δ A)), B with Euler's step Δ B, as in Mamba.
    h is the state before the first position (None: zeros); returns y and the state after the last."""
    delta = F.softplus(dt.float() + dt_bias.float()[:, None])  # (B, I, T)
    x_in, x, Bm, Cm = x, x.float(), Bm.float(), Cm.float()
    h = x.new_zeros(x.size(0), x.size(1), A.size(1)) if h is None else h.float()  # (B, I, N)
    ys = []
    for t in range(x.size(-1)):
        delta_t = delta[:, :, t, None]  # (B, I, 1)
        h = torch.exp(delta_t * A) * h + delta_t * Bm[:, None, :, t] * x[:, :, t, None]  # (B, I, N)
        ys.append((h * Cm[:, None, :, t]).sum(-1) + D * x[:, :, t])  # (B, I): C_t h_t + D x_t
    y = torch.stack(ys, dim=-1) if ys else x.new_zeros(x.shape)  # (B, I, T)
    return (y * F.silu(z.float())).type_as(x_in), h


# ----------------------------------------------------------------------------- the layer


class MambaLayer(nn.Module):
    """The Mamba block: in_proj -> (causal conv -> SiLU -> selective scan) * SiLU(z) -> out_proj."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        I, N, R = cfg.d_inner, cfg.d_state, cfg.dt_rank
        self.in_proj = nn.Linear(cfg.d_model, 2 * I, bias=cfg.bias)
        self.conv1d = nn.Conv1d(I, I, cfg.d_conv, groups=I, bias=cfg.conv_bias)  # depthwise; padded by hand
        self.dt_selective, self.bc_selective = cfg.selective in ("all", "dt"), cfg.selective in ("all", "bc")
        if cfg.selective != "none":  # dt (low rank), B and C from the input, those that are selective
            self.x_proj = nn.Linear(I, R * self.dt_selective + 2 * N * self.bc_selective, bias=False)
        if self.dt_selective:
            self.dt_proj = nn.Linear(R, I, bias=True)
        else:  # dt = softplus(dt_bias): one learned step size per channel, the same at every position
            self.dt_bias = nn.Parameter(torch.empty(I))
        if not self.bc_selective:  # one learned B and C per state entry, the same at every position
            self.B_lti, self.C_lti = nn.Parameter(torch.empty(N)), nn.Parameter(torch.empty(N))
        self.A_log = nn.Parameter(torch.empty(I, N))
        self.D = nn.Parameter(torch.empty(I))
        self.A_log._no_weight_decay = True  # decay would pull A towards -1 and D towards 0
        self.D._no_weight_decay = True
        self.out_proj = nn.Linear(I, cfg.d_model, bias=cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)
        self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self):
        """The initialisation of the official code for dt_proj, A and D. Model.init_weights calls it
        after its generic pass, which zeroes every Linear bias, dt_proj's included."""
        cfg = self.cfg
        I, N, R = cfg.d_inner, cfg.d_state, cfg.dt_rank
        if self.dt_selective:
            nn.init.uniform_(self.dt_proj.weight, -R ** -0.5, R ** -0.5)
        # dt = softplus(dt_proj(...) + bias) starts log-uniform in [dt_min, dt_max]: the bias
        # is the inverse softplus of such a dt, log(exp(dt) - 1) = dt + log(1 - exp(-dt))
        dt = torch.exp(torch.rand(I) * (math.log(cfg.dt_max) - math.log(cfg.dt_min)) + math.log(cfg.dt_min))
        dt = dt.clamp(min=cfg.dt_init_floor)
        self.delta_bias().copy_(dt + torch.log(-torch.expm1(-dt)))
        if not self.bc_selective:  # S4D's init (Gu et al. 2022): B = 1, C ~ N(0, 1)
            self.B_lti.fill_(1.0)
            nn.init.normal_(self.C_lti)
        # S4D-real: A = -(1, 2, ..., N) in every channel, stored as log(-A) so that A stays negative
        self.A_log.copy_(torch.log(torch.arange(1, N + 1, dtype=torch.float32)).repeat(I, 1))  # (I, N)
        self.D.fill_(1.0)

    def delta_bias(self):
        return self.dt_proj.bias if self.dt_selective else self.dt_bias  # (I,)

    def ssm_inputs(self, x):
        """x (B, I, T) -> dt (B, I, T) before its bias, B and C (B, N, T) each: computed from x where the
        layer is selective, the learned constants repeated at every position where it is not."""
        cfg = self.cfg
        Bsz, I, T = x.shape
        R, N = cfg.dt_rank, cfg.d_state
        sizes = [R] * self.dt_selective + [N, N] * self.bc_selective
        parts = list(self.x_proj(x.transpose(1, 2)).split(sizes, dim=-1)) if sizes else []  # (B, T, R), (B, T, N) x2
        if self.dt_selective:
            dt = (parts.pop(0) @ self.dt_proj.weight.t()).transpose(1, 2)  # (B, I, T); the bias goes in the scan
        else:
            dt = x.new_zeros(Bsz, I, T)  # (B, I, T): softplus(0 + dt_bias), the same at every position
        if self.bc_selective:
            Bm, Cm = (p.transpose(1, 2) for p in parts)  # (B, N, T) each
        else:
            Bm, Cm = (p.to(x.dtype)[None, :, None].expand(Bsz, N, T) for p in (self.B_lti, self.C_lti))  # (B, N, T) each
        return dt, Bm, Cm

    def forward(self, x, cache, layer):
        cfg = self.cfg
        B, T, C = x.shape
        W = cfg.d_conv
        x, z = self.in_proj(x).transpose(1, 2).chunk(2, dim=1)  # (B, I, T) each
        # causal convolution: the W - 1 inputs before this chunk are zeros or come from the cache
        past = F.pad(x, (W - 1, 0))[..., :W - 1] if cache is None else cache.conv[layer]  # (B, I, W-1)
        x_full = torch.cat((past.to(x.dtype), x), dim=-1)  # (B, I, W-1+T)
        if cache is not None:
            cache.conv[layer] = x_full[..., x_full.size(-1) - (W - 1):]  # the last W-1 inputs (none if W = 1)
        x = F.silu(self.conv1d(x_full))  # (B, I, T)
        dt, Bm, Cm = self.ssm_inputs(x)  # (B, I, T), (B, N, T) x2
        A = -torch.exp(self.A_log.float())  # (I, N)
        dt_bias = self.delta_bias()  # (I,)
        if cache is not None and T == 1:  # decoding: one step of the recurrence
            y, cache.ssm[layer] = kernels.selective_state_update(
                cache.ssm[layer], x[..., 0], dt[..., 0], A, Bm[..., 0], Cm[..., 0], self.D.float(), z[..., 0],
                dt_bias=dt_bias.float(), dt_softplus=True)
            y = y[..., None]  # (B, I, 1)
        elif cfg.scan == "loop":
            y, last = selective_scan_loop(x, dt, A, Bm, Cm, self.D.float(), z, dt_bias,
                                          None if cache is None else cache.ssm[layer])  # (B, I, T), (B, I, N)
            if cache is not None:
                cache.ssm[layer] = last
        else:
            impl = None if cfg.scan == "auto" else cfg.scan
            y = kernels.selective_scan(x, dt, A, Bm, Cm, self.D.float(), z, delta_bias=dt_bias.float(),
                                       delta_softplus=True, initial_state=None if cache is None else cache.ssm[layer],
                                       return_last_state=cache is not None, impl=impl)  # (B, I, T)
            if cache is not None:
                y, cache.ssm[layer] = y
        return self.drop(self.out_proj(y.transpose(1, 2)))  # (B, T, C)


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mixer = MambaLayer(cfg)  # "mixer": the official name, kept for its checkpoints

    def forward(self, x, cache, layer):
        return x + self.mixer(self.norm(x), cache, layer)  # one residual branch per layer, no separate MLP


# ----------------------------------------------------------------------------- the model


class Model(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm_f = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        self.init_weights()
        self.aux = {}

    @torch.no_grad()
    def init_weights(self):
        """The official initialisation (Gu & Dao's mamba_ssm: MixerModel's _init_weights and the Mamba
        block's own) for the blocks. Matrices and the convolution keep PyTorch's default, uniform in
        +-1/sqrt(fan_in), which keeps each layer's output at the scale of its input whatever the width.
        Linear biases start at zero, except dt_proj's (reset_ssm_parameters). Each layer's branch adds to
        the residual stream, so out_proj is further divided by sqrt(n_layer) (one branch per layer).
        The official model ties the head to an N(0, 0.02) embedding. At small width that small tied
        matrix leaves selective copying on a plateau (val_acc 0.18 after 1000 steps at d_model 64, where
        the untied rule below reaches 0.9 at d_model 80), as GPT-2's init does for attention; so by
        default the embedding and head follow model_transformer.py: embedding N(0, 1), the scale of the
        normalised stream it feeds, and an untied head at PyTorch's default. tie_embeddings=True gives
        the official initialisation exactly."""
        cfg = self.config
        for name, m in self.named_modules():
            if isinstance(m, (nn.Linear, nn.Conv1d)):
                m.reset_parameters()  # PyTorch's default: kaiming_uniform(a=sqrt(5)) = U(+-1/sqrt(fan_in))
                if isinstance(m, nn.Linear) and m.bias is not None:
                    nn.init.zeros_(m.bias)
                if name.endswith("out_proj"):
                    m.weight /= math.sqrt(cfg.n_layer)
        nn.init.normal_(self.wte.weight, std=0.02 if cfg.tie_embeddings else 1.0)  # after the loop: a tied head was reset
        for block in self.blocks:
            block.mixer.reset_ssm_parameters()

    def forward(self, idx, targets=None, cache=None):
        B, T = idx.shape
        x = self.drop(self.wte(idx))  # (B, T, C): no position embedding, the recurrence knows the order
        for layer, block in enumerate(self.blocks):
            x = block(x, cache, layer)
        if cache is not None:
            cache.len += T
        logits = self.lm_head(self.norm_f(x)).float()  # (B, T, V)
        loss = None
        if targets is not None:  # targets of -1 are ignored (the synthetic tasks score answers only)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
            self.aux = {"ce": loss.detach()}
        return logits, loss

    # ------------------------------------------------------------------------- generation

    def new_cache(self, batch_size, max_len=None, device=None, dtype=None):
        """max_len is accepted for the common interface and ignored: the cache has a fixed size."""
        cfg = self.config
        p = self.wte.weight
        return MambaCache(cfg.n_layer, batch_size, cfg.d_inner, cfg.d_conv, cfg.d_state,
                          device or p.device, dtype or p.dtype)

    def cache_bytes(self, cache):
        return cache.conv.nbytes + cache.ssm.nbytes

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None):
        """Yield (B, 1) new tokens: the prompt goes through the parallel scan, which leaves the
        conv and SSM states in the cache, then each step feeds only the newest token, in
        constant time and memory. No window is needed, whatever the length."""
        cache = self.new_cache(idx.size(0))
        logits, _ = self(idx, cache=cache)
        for _ in range(max_new_tokens):
            tok = sample_next(logits[:, -1], temperature, top_k, top_p)  # (B, 1)
            yield tok
            logits, _ = self(tok, cache=cache)

    # ------------------------------------------------------------------------- accounting

    def num_params(self, active=False):
        return sum(p.numel() for p in self.parameters())  # a dense model uses all of them per token

    def flops_per_token(self):
        """Training FLOPs per token: 6 per weight in a matrix multiply or the convolution (2 forward,
        4 backward), plus the scan, about 9 per state element forward (exp, the update, the
        readout), tripled for the backward: 27 * layers * I * N."""
        cfg = self.config
        weights = sum(m.weight.numel() for m in self.modules() if isinstance(m, (nn.Linear, nn.Conv1d)))
        return 6 * weights + 27 * cfg.n_layer * cfg.d_inner * cfg.d_state

    def optim_groups(self, weight_decay):
        """Matrices decay; vectors (norm gains, biases) and anything marked _no_weight_decay do not."""
        decays = {p: p.dim() >= 2 and not getattr(p, "_no_weight_decay", False) for p in self.parameters()}
        return [{"params": [p for p, d in decays.items() if d], "weight_decay": weight_decay},
                {"params": [p for p, d in decays.items() if not d], "weight_decay": 0.0}]

    def summary(self):
        cfg = self.config
        return (f"{cfg.n_layer} Mamba layers, d_inner {cfg.d_inner}, state {cfg.d_state}, conv {cfg.d_conv}, "
                f"dt rank {cfg.dt_rank}, {cfg.scan} scan, selective: {cfg.selective}")

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
