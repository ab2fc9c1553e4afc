"""
The four models side by side at matched active parameters and equal tokens: text and recall tasks,
costs, decoding at long context.
"""
import torch

import data
from lab.charts import svg_lines
from lab.measure import decode_speed, table
from lab.runner import config_args, matched_archs, mean_spread, model_module, params_of, vocab_of


def measure_decode(model, cfg, vocab_size, context, steps):
    """decode_speed of model `model` with these fields, random weights (speed and memory do not depend on
    their values), block_size = context."""
    module = model_module(model)
    torch.manual_seed(0)
    m = module.Model(module.Config(**cfg, vocab_size=vocab_size, block_size=context)).eval()
    return decode_speed(m, vocab_size, context, steps)


def architectures(lab):
    """the four models at matched active parameters and equal tokens: text and recall tasks, costs, decoding at long context"""
    datasets = ["pydoc", *data.SYNTHETIC] if not lab.quick else ["mqar"]
    run = dict(block_size=64, batch_size=16, max_iters=1200, eval_interval=100, eval_iters=10, lr=2e-3, min_lr=2e-4,
               warmup_iters=50)
    context, steps = (4096, 64) if not lab.quick else (256, 16)
    if lab.quick:
        run.update(max_iters=4, eval_interval=2, eval_iters=2, warmup_iters=2)
    archs = {"transformer": ("transformer", {}), "moe": ("moe", {}), "mamba": ("mamba", {}),
             "hybrid": ("hybrid", {"layers": "Md Me Ad Me"})}  # Jamba's interleaving (attention 1 in 4 here, 1 in 8 in Jamba), at 4 layers
    text, synthetic = datasets[0], [ds for ds in datasets if ds in data.SYNTHETIC]
    vocabs = {ds: vocab_of(ds, lab.data_dir) for ds in datasets}
    sized = matched_archs(archs, vocabs[text], run["block_size"], 64, 2)  # sizes chosen on the text, kept for all
    runs = [(f"{ds}-{label}", [f"--model={m}", f"--dataset={ds}", *config_args({**run, **cfg}),
                               f"--log_interval={run['eval_interval']}"])
            for ds in datasets for label, (m, cfg) in sized.items()]
    results = lab.train(runs)
    cost, learned, curves = [], [], {}
    for label, (m, cfg) in sized.items():
        params, active, flops = params_of(m, cfg, vocabs[text], run["block_size"])
        r = results[f"{text}-{label}"]
        tok_s = r.final["tokens"] / r.final["train_time"] if r.ok and r.final.get("train_time") else float("nan")
        dec, cache = measure_decode(m, cfg, vocabs[text], context, steps)
        shape = f"{cfg['d_model']} x {cfg.get('n_layer', len(cfg.get('layers', '').split()))}"
        cost.append([label, shape, f"{params / 1e6:.3f}M", f"{active / 1e6:.3f}M", f"{flops / 1e6:.2f}",
                     f"{tok_s:,.0f}", f"{dec:,.0f}", f"{cache / 2**20:.2f} MiB"])
        row = [label] + [mean_spread([results[f"{ds}-{label}"].final.get("val_loss", float("nan"))]) for ds in datasets]
        for ds in synthetic:
            f = results[f"{ds}-{label}"].final
            row.append(f"{mean_spread([f.get('val_acc', float('nan'))])} ({mean_spread([f.get('val_baseline', float('nan'))])})")
        if "induction" in datasets:
            row.append(mean_spread([results[f"induction-{label}"].final.get("val_acc_4x", float("nan"))]))
        learned.append(row)
        for ds in datasets:
            curves.setdefault(ds, {})[label] = [(e["tokens"], e["val_loss"]) for e in results[f"{ds}-{label}"].evals]
    head = ["model"] + [f"{ds} val loss" for ds in datasets] + [f"{ds} acc (no-recall)" for ds in synthetic] \
        + (["induction acc @4x"] if "induction" in datasets else [])
    tokens = run["max_iters"] * run["batch_size"] * run["block_size"]
    body = (f"Every run: {run['max_iters']} iters x {run['batch_size']} x {run['block_size']} = {tokens / 1e6:.2f}M "
            f"training tokens, lr {run['lr']}, the same options for every model (nothing tuned per architecture). "
            f"Sizes: the Transformer at d_model 64 x 2 layers sets the active-parameter target on `{text}`; every "
            f"other model gets the width (and depth) nearest it, kept for all datasets. The hybrid is Jamba's "
            f"interleaving at 4 layers, Md Me Ad Me (attention 1 layer in 4 where Jamba has 1 in 8).\n\n"
            f"Costs on `{text}` (decoding: batch 1, median of {steps} one-token steps after a {context - steps}-token "
            f"prefill, float32, random weights, {torch.get_num_threads()} thread(s), in this process after training):\n\n"
            + table(["model", "d_model x n_layer", "params", "active", "MFLOPs/token", "train tok/s",
                     f"decode tok/s @{context}", f"cache @{context}"], cost)
            + "\n\nWhat each learned: validation loss (the synthetic tasks: on the answers only), answer accuracy with "
            "the no-recall baseline measured on the same answers in brackets (val_baseline), and induction "
            "at 4x the training length:\n\n" + table(head, learned))
    panels = [dict(title=ds, xlabel="training tokens", ylabel="validation loss", series=curves[ds]) for ds in datasets]
    lab.page("The architectures side by side", body, svg_lines(panels))
