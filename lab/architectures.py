"""
The four models side by side at matched active parameters and equal tokens of text: loss, costs, decoding
at long context.
"""
import torch

from lab.charts import svg_lines
from lab.measure import decode_speed, table
from lab.runner import config_args, data_of, matched_archs, model_module, params_of, quick_note, vocab_of
from lab.verdicts import claim, fixed_batches, fmt, score_run


def measure_decode(model, cfg, vocab_size, context, steps):
    """decode_speed of model `model` with these fields, random weights (speed and memory do not depend on
    their values), block_size = context."""
    module = model_module(model)
    torch.manual_seed(0)
    m = module.Model(module.Config(**cfg, vocab_size=vocab_size, block_size=context)).eval()
    return decode_speed(m, vocab_size, context, steps)


def architectures(lab):
    """the four models at matched active parameters and equal tokens on text: loss, costs, decoding at long context"""
    text = "pydoc"  # the built-in corpus: no download; recall is the recall and mqar pages' subject
    run = dict(dataset=text, block_size=64, batch_size=16, max_iters=1200, eval_interval=200, eval_iters=4, lr=2e-3,
               min_lr=2e-4, warmup_iters=50)
    context, steps, n_val = (4096, 64, 16) if not lab.quick else (256, 16, 2)
    if lab.quick:
        run.update(max_iters=4, eval_interval=2, eval_iters=1, warmup_iters=2)
    archs = {"transformer": ("transformer", {}), "moe": ("moe", {}), "mamba": ("mamba", {}),
             "hybrid": ("hybrid", {"layers": "Md Me Ad Me"})}  # Jamba's interleaving at 4 layers (attention 1 in 4; Jamba: 1 in 8)
    vocab = vocab_of(text, lab.data_dir)
    sized = matched_archs(archs, vocab, run["block_size"], 64, 2)
    seeds = lab.seed_values(1 if lab.quick else None)
    results = lab.train([(f"{label}-s{seed}", [f"--model={m}", f"--seed={seed}", *config_args({**run, **cfg}),
                                               f"--log_interval={run['eval_interval']}"])
                         for label, (m, cfg) in sized.items() for seed in seeds])
    batches = fixed_batches(data_of(text, lab.data_dir), n_val, run["batch_size"], run["block_size"])
    loss = {label: [score_run(results[f"{label}-s{seed}"], batches)[0] for seed in seeds] for label in sized}
    cost, learned, curves = [], [], {}
    for label, (m, cfg) in sized.items():
        params, active, flops = params_of(m, cfg, vocab, run["block_size"])
        runs = [results[f"{label}-s{seed}"] for seed in seeds]
        tok_s = [r.final["tokens"] / r.final["train_time"] for r in runs if r.ok and r.final.get("train_time")]
        dec, cache = measure_decode(m, cfg, vocab, context, steps)
        shape = f"{cfg['d_model']} x {cfg.get('n_layer', len(cfg.get('layers', '').split()))}"
        cost.append([label, shape, f"{params / 1e6:.3f}M", f"{active / 1e6:.3f}M", f"{flops / 1e6:.2f}",
                     fmt(tok_s, ",.0f"), f"{dec:,.0f}", f"{cache / 2**20:.2f} MiB"])
        learned.append([label, fmt(loss[label])])
        evals = [r.evals for r in runs if r.ok]  # the seeds' curves share their evaluation steps
        if evals:
            curves[label] = [(e["tokens"], sum(ev[i]["val_loss"] for ev in evals) / len(evals))
                             for i, e in enumerate(evals[0]) if all(len(ev) > i for ev in evals)]
    tokens = run["max_iters"] * run["batch_size"] * run["block_size"]
    where = f"the four model files at ~{params_of('transformer', sized['transformer'][1], vocab, run['block_size'])[1] / 1e3:.0f}K active parameters, {tokens / 1e6:.2f}M tokens of text"
    body = (quick_note(lab) + f"Every run: {run['max_iters']} iters x {run['batch_size']} x {run['block_size']} = "
            f"{tokens / 1e6:.2f}M training tokens of `{text}` (the built-in corpus: Python's documentation, by "
            f"character), lr {run['lr']}, the same options for every model (nothing tuned per architecture), "
            f"{len(seeds)} seed(s). Sizes: the Transformer at d_model 64 x 2 layers sets the active-parameter target; "
            f"every other model gets the width (and depth) nearest it. The MoE is model_moe.py's default (top-2 of 8 "
            f"experts); the hybrid is Jamba's interleaving at 4 layers, Md Me Ad Me (attention 1 layer in 4 where "
            f"Jamba has 1 in 8; every other layer has an MoE feed-forward, as in Jamba).\n\n"
            f"Costs (train tok/s: each run's own, two runs at once on the 2 cores; decoding: batch 1, median of {steps} "
            f"one-token steps after a {context - steps}-token prefill, float32, random weights, "
            f"{torch.get_num_threads()} thread(s), in this process after training):\n\n"
            + table(["model", "d_model x n_layer", "params", "active", "MFLOPs/token", "train tok/s",
                     f"decode tok/s @{context}", f"cache @{context}"], cost)
            + f"\n\nValidation loss of each run's last checkpoint on the same {n_val} fixed batches, mean ± sd over "
              f"seeds:\n\n" + table(["model", f"{text} val loss"], learned)
            + "\n\nThe papers' claims at equal active parameters and tokens, checked against this table (a difference "
              "counts when it exceeds 2 standard errors):\n\n"
            + "\n".join([
                claim(f"{where}: Mamba reaches a lower loss than the Transformer (Gu & Dao 2023, section 4.2)", "Mamba",
                      loss["mamba"], "Transformer", loss["transformer"], "<"),
                claim(f"{where}: the MoE reaches a lower loss than the dense Transformer (Fedus et al. 2021)", "MoE",
                      loss["moe"], "Transformer", loss["transformer"], "<"),
                claim(f"{where}: the Jamba-style hybrid reaches a lower loss than the Transformer (Lieber et al. 2024)",
                      "hybrid", loss["hybrid"], "Transformer", loss["transformer"], "<")])
            + f"\n\nWhat this does not show: the papers' scales (10^8 parameters and more) and their tuned recipes; "
              f"one small budget with one learning rate for all four.")
    panels = [dict(title=f"{text} (mean over seeds)", xlabel="training tokens", ylabel="validation loss", series=curves)]
    lab.page("The architectures side by side", body, svg_lines(panels, cols=1, width=560, height=320))
