"""
The 1/sqrt(d_k) scale of attention (Vaswani et al. 2017, section 3.2.1): without it the dot products grow
with the head dim, the softmax saturates and its gradients vanish. Head dims 16 to 128 at one width, the
scale 1/sqrt(D), 1 and muP's 1/D: attention entropy per layer at init and over training, the gradient
that reaches q and k, the loss.
"""
import concurrent.futures
import hashlib
import inspect
import json
import math
from pathlib import Path

import torch

import data
import kernels
import model_transformer
from lab.charts import svg_lines
from lab.inspection import attention_maps
from lab.measure import table
from lab.runner import data_of
from lab.verdicts import claim, fixed_batches, fmt, mean_sd, score, train_in_process

SCALES = {"sqrt": "1/sqrt(D)", "one": "1", "dim": "1/D"}


def entropies(model, x):
    """Mean entropy (nats) of the attention rows of each layer, over heads, rows and batch."""
    return [-(p * p.clamp_min(1e-30).log()).sum(-1).mean().item() for p in attention_maps(model, x)]


def qk_grad_norm(model, x, y):
    """Norm of the loss's gradient with respect to the query and key rows of every layer's qkv matrix."""
    cfg = model.config
    model.zero_grad(set_to_none=True)
    model(x, y)[1].backward()
    rows = (cfg.n_head + cfg.n_kv_head) * cfg.head_dim
    norm = math.sqrt(sum(b.attn.qkv.weight.grad[:rows].pow(2).sum().item() for b in model.blocks))
    model.zero_grad(set_to_none=True)
    return norm


def cell_code():
    """A hash of what decides a cell's numbers: the model file, kernels, data and the in-process loop and probes."""
    digest = hashlib.sha256()
    for f in (model_transformer.__file__, kernels.__file__, data.__file__):
        digest.update(Path(f).read_bytes())
    for fn in (train_in_process, score, fixed_batches, attention_maps, entropies, qk_grad_norm, cell):
        digest.update(inspect.getsource(fn).encode())
    return digest.hexdigest()[:16]


def cell(D, scale, seed, run, data_dir, n_val, runs_dir):
    """Train one (head dim, scale, seed) in this worker on one thread; its numbers are kept in runs_dir and read
    back, not retrained, while the same run is asked of the same code."""
    torch.set_num_threads(1)
    path, code = Path(runs_dir) / f"D{D}-{scale}-s{seed}.json", cell_code()
    if path.is_file():
        done = json.loads(path.read_text())
        if done["run"] == run and done["n_val"] == n_val and done["code"] == code:
            return {**done["result"], "reused": True}
    corpus = data_of(run["dataset"], data_dir)
    batches = fixed_batches(corpus, n_val, run["batch_size"], run["block_size"])
    probe_x, probe_y = batches[0]
    torch.manual_seed(seed)
    H = run["d_model"] // D
    model = model_transformer.Model(model_transformer.Config(
        vocab_size=corpus.vocab_size, block_size=run["block_size"], d_model=run["d_model"], n_layer=run["n_layer"],
        n_head=H, n_kv_head=H, attn_scale=scale, flash=True))
    curve = []
    probe = lambda step: curve.append((step, entropies(model, probe_x), qk_grad_norm(model, probe_x, probe_y)))
    history = train_in_process(model, corpus, run["steps"], run["batch_size"], run["lr"], seed, probe, run["every"],
                               warmup=30)
    result = dict(curve=curve, loss=score(model, batches)[0], grad=[g for _, _, g in history])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dict(run=run, n_val=n_val, code=code, result=result)))
    return {**result, "reused": False}


def attn_scale(lab):
    """the 1/sqrt(d) attention scale against 1 and 1/d at head dims 16..128: entropy, q/k gradient, loss"""
    run = dict(dataset="shakespeare_char", d_model=128, n_layer=2, block_size=128, batch_size=16, steps=300, lr=1e-3, every=50)
    head_dims, n_val = (16, 32, 64, 128), 8
    if lab.quick:
        run.update(dataset="pydoc", block_size=16, batch_size=2, steps=2, every=1)
        head_dims, n_val = (64, 128), 1
    cells = [(D, scale, seed) for D in head_dims for scale in SCALES for seed in lab.seed_values()]
    res = {}  # (D, scale) -> [per seed: dict]
    with concurrent.futures.ProcessPoolExecutor(lab.jobs) as pool:  # one thread each, like the training runs
        futures = [pool.submit(cell, D, scale, seed, run, lab.data_dir, n_val, str(lab.runs_dir)) for D, scale, seed in cells]
        for (D, scale, seed), f in zip(cells, futures):
            r = f.result()
            res.setdefault((D, scale), []).append(r)
            print(f"  head dim {D}, scale {SCALES[scale]}, seed {seed}: val {r['loss']:.3f}"
                  f"{' (reused)' if r['reused'] else ''}", flush=True)
    L = run["n_layer"]
    at = lambda D, s, i, l: [r["curve"][i][1][l] for r in res[D, s]]  # entropy of layer l at probe i, per seed
    rows = []
    for D in head_dims:
        for s, label in SCALES.items():
            rs = res[D, s]
            rows.append([D, run["d_model"] // D, label, *(fmt(at(D, s, 0, l), ".2f") for l in range(L)),
                         *(fmt(at(D, s, -1, l), ".2f") for l in range(L)), fmt([r["curve"][0][2] for r in rs], ".3g"),
                         fmt([sorted(r["grad"])[len(r["grad"]) // 2] for r in rs], ".3g"), fmt([r["loss"] for r in rs])])
    big = max(head_dims)
    init_ent = lambda D, s: [sum(r["curve"][0][1]) / L for r in res[D, s]]  # layers' mean, per seed
    factor = {"sqrt": lambda D: 1 / math.sqrt(D), "one": lambda D: 1.0, "dim": lambda D: 1 / D}
    softmax_grad = lambda D, s: [r["curve"][0][2] / factor[s](D) for r in res[D, s]]  # q/k gradient over the scale
    T = run["block_size"]
    uniform = sum(math.log(t) for t in range(1, T + 1)) / T  # attention spread evenly over the past
    tokens = run["steps"] * run["batch_size"] * run["block_size"]
    body = (f"A {L}-layer Transformer (MHA, d_model {run['d_model']}, so head dim D = {run['d_model']} / heads) on "
            f"`{run['dataset']}`, trained in this process ({run['steps']} AdamW steps of {run['batch_size']} x {T} tokens, "
            f"{tokens / 1e6:.2f}M, lr {run['lr']} after 30 warmup steps, clipping at 1.0), {lab.seeds} seed(s) per cell. "
            f"Entropy: of each attention row, in nats, averaged over heads and rows of one fixed batch (uniform attention "
            f"over the past would give {uniform:.2f}); at init and at the end of training, per layer. q/k gradient: "
            f"the norm of the loss's gradient on the query and key rows of the qkv matrices at init, on the same batch. "
            f"Grad norm: the median over training of the whole model's gradient norm (before clipping). Val loss: "
            f"the same {n_val} fixed validation batches for every model and seed. Mean ± sd (n).\n\n"
            + table(["D", "heads", "scale", *(f"entropy init L{l}" for l in range(L)), *(f"entropy end L{l}" for l in range(L)),
                     "q/k grad init", "grad norm", "val loss"], rows)
            + f"\n\nThe course's claim, checked at head dim {big} against the table (a difference counts when it exceeds "
            "2 standard errors):\n\n"
            + "\n".join([
                claim(f"attention, head dim {big}: without the 1/sqrt(d) scale the softmax starts saturated (lower entropy at init)", "scale 1",
                      init_ent(big, "one"), "1/sqrt(D)", init_ent(big, "sqrt"), "<", ".2f"),
                claim(f"attention, head dim {big}: without the scale less gradient reaches q and k at init", "scale 1",
                      [r["curve"][0][2] for r in res[big, "one"]], "1/sqrt(D)", [r["curve"][0][2] for r in res[big, "sqrt"]], "<", ".3g"),
                claim(f"attention, head dim {big}: without the scale the softmax passes less gradient at init (the q/k "
                      f"gradient divided by the scale, which multiplies it)", "scale 1", softmax_grad(big, "one"),
                      "1/sqrt(D)", softmax_grad(big, "sqrt"), "<", ".3g"),
                claim(f"attention, head dim {big}: without the scale the model trains to a higher val loss", "scale 1", [r["loss"] for r in res[big, "one"]],
                      "1/sqrt(D)", [r["loss"] for r in res[big, "sqrt"]], ">")])
            + f"\n\nWhy q and k get more gradient without the scale, not less: the gradient that reaches them is the "
              f"softmax's times the scale. At init, through the softmax alone, scale 1 passes "
              f"{mean_sd(softmax_grad(big, 'one'))[0] / mean_sd(softmax_grad(big, 'sqrt'))[0]:.2f} of what 1/sqrt(D) "
              f"passes (saturation, the entropy column), while the missing scale multiplies it by sqrt({big}) = "
              f"{math.sqrt(big):.1f}: at this initialisation the softmax is not yet saturated enough for its gradient to "
              f"vanish. Vaswani et al.'s argument is about large dot products; the entropy over training (the picture) "
              f"shows how much further scale 1 saturates as the weights grow.")
    mean_curve = lambda D, s: [(step, mean_sd([r["curve"][i][1][l] for r in res[D, s] for l in range(L)])[0])
                               for i, (step, _, _) in enumerate(res[D, s][0]["curve"])]
    panels = [dict(title="entropy at init against head dim", xlabel="head dim", ylabel="entropy (nats)", logx=True,
                   series={SCALES[s]: [(D, mean_sd(init_ent(D, s))[0]) for D in head_dims] for s in SCALES}),
              dict(title="val loss against head dim", xlabel="head dim", ylabel="val loss", logx=True,
                   series={SCALES[s]: [(D, mean_sd([r["loss"] for r in res[D, s]])[0]) for D in head_dims] for s in SCALES}),
              dict(title=f"entropy over training, head dim {big}", xlabel="step", ylabel="entropy (nats)",
                   series={SCALES[s]: mean_curve(big, s) for s in SCALES})]
    lab.page("The attention scale: 1/sqrt(d) against 1 and 1/d", body, svg_lines(panels, cols=3, width=340))

