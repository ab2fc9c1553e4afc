"""
What trained models do, drawn: a Transformer's attention maps per layer and head, and a Mamba layer's
implicit attention matrix (Ali et al. 2024, "The Hidden Attention of Mamba Models"), on the same multi_induction
batch, side by side. Also the maps themselves, which attn_scale reads for its entropies.
"""
import math
import sys
from html import escape

import torch
import torch.nn.functional as F

import model_mamba
import model_transformer
from lab.charts import COLOURS
from lab.measure import table
from lab.runner import data_of
from lab.verdicts import fixed_batches, score, train_in_process


def layer_inputs(model, modules, idx):
    """The positional arguments each of `modules` received in one forward of idx."""
    seen = []
    hooks = [m.register_forward_pre_hook(lambda mod, args: seen.append(args)) for m in modules]
    try:
        with torch.no_grad():
            model(idx)
    finally:
        for h in hooks:
            h.remove()
    return seen


@torch.no_grad()
def attention_maps(model, idx):
    """[(B, H, T, T)] per layer: the attention probabilities of a Transformer or MoE model (model_transformer's
    Attention) on idx, recomputed from each layer's input with the layer's weights, scale and positions."""
    cfg, apply_rope = model.config, sys.modules[type(model).__module__].apply_rope
    H, G, D = cfg.n_head, cfg.n_kv_head, cfg.head_dim
    maps = []
    for block, (x, rope, *_) in zip(model.blocks, layer_inputs(model, [b.attn for b in model.blocks], idx)):
        B, T, _ = x.shape
        qk = block.attn.qkv(x)[..., :(H + G) * D].view(B, T, H + G, D)  # as Attention.forward
        if rope is not None:
            qk = apply_rope(qk, *rope)
        q, k = qk.transpose(1, 2).split([H, G], dim=1)  # (B, H, T, D), (B, G, T, D)
        scores = (q @ k.repeat_interleave(H // G, dim=1).transpose(-2, -1)).float() * block.attn.scale  # (B, H, T, T)
        i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
        if cfg.pos == "alibi":
            scores = scores - block.attn.alibi.view(H, 1, 1) * (i - j)
        maps.append(torch.softmax(scores.masked_fill(j > i, float("-inf")), dim=-1))
    return maps


def implicit_attention(delta, A, Bm, Cm):
    """alpha (B, I, T, T): alpha[b, i, t, s] = sum_n C_t[n] exp(sum_{r=s+1..t} delta_r A[i, n]) delta_s B_s[n] for
    s <= t, 0 after: the weight of input x_s in output y_t of channel i, so the scan is y = alpha x (+ D x, then the
    gate). delta (B, I, T) after softplus, A (I, N), Bm and Cm (B, N, T)."""
    T = delta.size(-1)
    cum = torch.cumsum(delta[..., None] * A[:, None, :], dim=2)  # (B, I, T, N): sum over r <= t of delta_r A
    later = torch.arange(T)[None, :] > torch.arange(T)[:, None]  # (T, T) [t, s]: s after t
    gap = (cum[:, :, :, None, :] - cum[:, :, None, :, :]).masked_fill(later[:, :, None], float("-inf"))  # (B, I, T, T, N)
    return torch.einsum("bnt,bitsn,bis,bns->bits", Cm, gap.exp(), delta, Bm)  # (B, I, T, T)


@torch.no_grad()
def mamba_attention(model, idx):
    """[(B, I, T, T)] per layer: the implicit attention of each Mamba layer (model_mamba) on idx."""
    out = []
    for block, (x, *_) in zip(model.blocks, layer_inputs(model, [b.mixer for b in model.blocks], idx)):
        mx, W = block.mixer, model.config.d_conv
        u = mx.in_proj(x).transpose(1, 2).chunk(2, dim=1)[0]  # (B, I, T): the scan's stream, before the conv
        u = F.silu(mx.conv1d(F.pad(u, (W - 1, 0))))  # (B, I, T): the causal conv from zeros, as MambaLayer.forward
        dt, Bm, Cm = mx.ssm_inputs(u)
        delta = F.softplus(dt.float() + mx.delta_bias().float()[:, None])  # (B, I, T)
        out.append(implicit_attention(delta, -torch.exp(mx.A_log.float()), Bm.float(), Cm.float()))
    return out


def induction_score(attn, x, trigger):
    """Mean weight that the query rows give to the token right after the earlier occurrence of their own token
    (the off-by-one diagonal of an induction head). attn (T, T), x (T,); the queries are the positions after a
    `trigger` token (the task's '!')."""
    hits = []
    for t in range(1, x.numel()):
        if x[t - 1] != trigger:
            continue
        earlier = [s for s in range(t - 1) if x[s] == x[t]]
        if earlier:
            hits.append(attn[t, earlier[-1] + 1].item())
    return sum(hits) / len(hits) if hits else float("nan")


def svg_heatmaps(panels, cell=4, cols=4):
    """Heat maps: [(title, (T, T) tensor of weights >= 0)], each scaled to its own maximum, white to blue."""
    T = panels[0][1].size(0)
    size, pad = cell * T, 22
    rows_n = math.ceil(len(panels) / cols)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{cols * (size + pad) + pad}" height="{rows_n * (size + 2 * pad) + pad}" '
           f'font-family="sans-serif" font-size="10">', '<rect width="100%" height="100%" fill="white"/>']
    r, g, b = (int(COLOURS[0][i:i + 2], 16) for i in (1, 3, 5))
    for k, (title, m) in enumerate(panels):
        ox, oy = pad + (k % cols) * (size + pad), pad + (k // cols) * (size + 2 * pad)
        out.append(f'<text x="{ox}" y="{oy - 6}">{escape(title)}</text>'
                   f'<rect x="{ox}" y="{oy}" width="{size}" height="{size}" fill="none" stroke="#888"/>')
        m = m / m.max().clamp_min(1e-12)
        for t in range(T):
            for s in range(t + 1):
                v = m[t, s].item()
                if v > 0.02:  # fainter cells stay white: a smaller file
                    out.append(f'<rect x="{ox + s * cell}" y="{oy + t * cell}" width="{cell}" height="{cell}" '
                               f'fill="rgb({round(255 - v * (255 - r))},{round(255 - v * (255 - g))},{round(255 - v * (255 - b))})"/>')
    out.append(f'<text x="{pad}" y="{rows_n * (size + 2 * pad) + pad - 6}">rows: query position t; columns: key position '
               f's &lt;= t; each map scaled to its largest weight</text>')
    return "\n".join(out + ["</svg>"]) + "\n"


def inspect_models(lab):
    """a trained Transformer's attention maps and a Mamba's implicit attention on the same multi_induction batch, as SVG"""
    run = dict(block_size=48, batch_size=32, steps=600, lr=3e-3, d_model=64, n_layer=2)
    if lab.quick:
        run.update(block_size=24, batch_size=4, steps=3, d_model=16)
    task = data_of("multi_induction", lab.data_dir)
    trigger = task.tokenizer_spec["words"].index("!")  # the token before each query (data.SynthData)
    models = {"transformer": model_transformer.Model(model_transformer.Config(
                  vocab_size=task.vocab_size, block_size=run["block_size"], d_model=run["d_model"], n_layer=run["n_layer"],
                  n_head=4, n_kv_head=4)),
              "mamba": model_mamba.Model(model_mamba.Config(
                  vocab_size=task.vocab_size, block_size=run["block_size"], d_model=run["d_model"], n_layer=run["n_layer"]))}
    batches = fixed_batches(task, 4, 32 if not lab.quick else 2, run["block_size"])
    rows, panels, best, seed = [], [], {}, lab.first_seed
    x = batches[0][0][:1]  # (1, T): one sequence of the fixed batches, the same for both models
    for name, model in models.items():
        torch.manual_seed(seed)
        model.init_weights()
        train_in_process(model, task, run["steps"], run["batch_size"], run["lr"], seed, warmup=20)
        loss, acc = score(model, batches)
        if name == "transformer":
            maps = [(f"layer {l} head {h}", m[0, h]) for l, m in enumerate(attention_maps(model, x)) for h in range(m.size(1))]
        else:  # channels averaged, by magnitude: their signs differ
            maps = [(f"layer {l}, implicit", a[0].abs().mean(0))
                    for l, a in enumerate(mamba_attention(model, x))]
        for title, m in maps:
            found = induction_score(m / m.sum(-1, keepdim=True).clamp_min(1e-12), x[0], trigger)
            rows.append([name, title, f"{loss:.3f}", f"{acc:.3f}", f"{found:.3f}"])
            best[name] = max(best.get(name, (-1.0, "")), (found, title))
        panels += [(f"{name}: {title}", m) for title, m in maps]
    T = run["block_size"]
    uniform = induction_score(torch.tril(torch.ones(T, T)) / torch.arange(1, T + 1)[:, None], x[0], trigger)
    body = (f"A {run['n_layer']}-layer Transformer (4 heads) and a {run['n_layer']}-layer Mamba, d_model {run['d_model']}, "
            f"each trained in this process for {run['steps']} steps of {run['batch_size']} multi_induction sequences of "
            f"{run['block_size']} tokens (lr {run['lr']}, seed {seed}); loss and accuracy on 4 fixed validation batches; "
            f"the maps are of the first sequence of those batches. The induction score is the weight a query row (the "
            f"token after '!') gives to the position right after the earlier occurrence of its token, where the answer "
            f"is: an induction head puts it on that off-by-one diagonal (Olsson et al. 2022). For Mamba, the map is "
            f"alpha[t, s] = C_t exp(sum over r in (s, t] of delta_r A) delta_s B_s (Ali et al. 2024), channels averaged "
            f"by magnitude, rows normalised for the score.\n\n"
            + table(["model", "map", "val loss", "val acc", "induction score"], rows)
            + f"\n\nAttention spread evenly over the past would score {uniform:.3f} on this sequence. The Transformer's "
            f"highest score is {best['transformer'][0]:.3f} ({best['transformer'][1]}), {best['transformer'][0] / uniform:.1f} "
            f"times that; Mamba's is {best['mamba'][0]:.3f} ({best['mamba'][1]}), {best['mamba'][0] / uniform:.1f} times."
            + "\n\nOne seed: a picture, not a comparison; the score says where the pattern is, not how reliably it "
            "is learned.")
    lab.page("Inside trained models: attention maps and Mamba's implicit attention", body, svg_heatmaps(panels))
