"""
Dense against Mixture-of-Experts at equal active parameters and equal tokens; expert load over training.
"""
from lab.charts import svg_lines
from lab.measure import table
from lab.runner import config_args, data_of, mean_spread, model_module, params_of


def moe(lab):
    """dense vs Mixture-of-Experts at equal active parameters and equal tokens; expert load over training"""
    # Character-level tiny Shakespeare (1.0M characters, vocabulary 65): the embedding is a few thousand
    # parameters, so "equal active parameters" is about the blocks, where MoE adds its experts. With GPT-2
    # BPE (50K vocabulary) the embedding and the head would be 6.4M parameters at d_model 64, dwarfing the
    # feed-forward layers MoE multiplies, on a 338K-token corpus that a model of that size memorises.
    run = dict(dataset="shakespeare_char", block_size=128, batch_size=16, max_iters=2000, eval_interval=200,
               eval_iters=10, lr=2e-3, min_lr=2e-4, warmup_iters=100, d_model=64, n_layer=4, n_head=4)
    if lab.quick:
        run.update(block_size=32, batch_size=4, max_iters=4, eval_interval=2, eval_iters=1, warmup_iters=1,
                   d_model=48, n_layer=1)
    d_ff = model_module("moe").Config(d_model=run["d_model"]).d_ff  # the dense model's SwiGLU hidden size
    variants = {  # label: (model, fields); every MoE routes each token through d_ff of expert width in all
        "dense": ("transformer", {}),
        "MoE 8 x top-1": ("moe", dict(n_expert=8, top_k=1)),  # Switch: one full-size expert per token
        "MoE 16 x top-2, half-width": ("moe", dict(n_expert=16, top_k=2, d_expert=d_ff // 2)),  # fine-grained
    }
    seeds = lab.seed_values()
    names = {f"{v.split(' ')[0]}{i}-s{seed}": (v, seed) for i, v in enumerate(variants) for seed in seeds}
    results = lab.train([(name, [f"--model={variants[v][0]}", f"--seed={seed}",
                                 *config_args({**run, **variants[v][1]}), f"--log_interval={run['eval_interval']}"])
                         for name, (v, seed) in names.items()])
    by = {v: [r for name, r in results.items() if names[name][0] == v] for v in variants}
    corpus = data_of(run["dataset"], lab.data_dir)
    vocab, train_tokens = corpus.vocab_size, len(corpus.train)
    shape = {k: run[k] for k in ("d_model", "n_layer", "n_head")}
    dense_ms = sum(r.ms_per_step() for r in by["dense"]) / len(by["dense"])
    rows, curves, load = [], {}, {}
    for v, (m, fields) in variants.items():
        total, active, flops = params_of(m, {**shape, **fields}, vocab, run["block_size"])
        fin = lambda key: [r.final.get(key, float("nan")) for r in by[v]]
        ms = sum(r.ms_per_step() for r in by[v]) / len(by[v])
        rows.append([v, f"{total:,}", f"{active:,}", f"{flops / 1e6:.2f}", mean_spread(fin("val_loss")),
                     mean_spread(fin("train_loss")), f"{ms / dense_ms:.2f}x"]
                    + ([mean_spread(fin("moe_ent"), ".2f"), mean_spread(fin("moe_vio"), ".2f"),
                        mean_spread(fin("moe_dead"), ".0f")] if m == "moe" else ["", "", ""]))
        first = by[v][0]
        curves[v] = [(e["tokens"], e["val_loss"]) for e in first.evals]
        if m == "moe":
            load[v] = first.evals
    tokens = run["max_iters"] * run["batch_size"] * run["block_size"]
    body = (f"Character-level tiny Shakespeare ({train_tokens:,} training tokens), d_model {run['d_model']} x "
            f"{run['n_layer']} layers, {run['max_iters']} iters x {run['batch_size']} x {run['block_size']} = "
            f"{tokens / 1e6:.2f}M training tokens ({tokens / train_tokens:.1f} epochs), lr {run['lr']}, "
            f"{lab.seeds} seed(s) each. Every MoE layer replaces the SwiGLU feed-forward (hidden {d_ff}) and routes "
            f"each token through the same {d_ff} of expert width: top-1 of full-size experts (Switch), or top-2 of "
            f"half-width ones (fine-grained, DeepSeekMoE), so active parameters and FLOPs per token match the dense "
            f"model (plus the router) while total parameters grow with the experts. Active parameters count the embedding and the output layer. Load statistics are the MoE layers' mean at the last "
            f"evaluation: entropy of the expert load / ln E (1 = uniform), max load / mean load - 1, experts "
            f"that got no token. Step time is relative to the dense model in the same experiment (CPU, shared "
            f"machine: a ratio, not a speed claim).\n\n"
            + table(["model", "params", "active", "MFLOPs/token", "val loss", "train loss", "time/step",
                     "load entropy", "max violation", "dead experts"], rows))
    panels = [dict(title="validation loss", xlabel="training tokens", ylabel="val loss", series=curves),
              dict(title="expert load over training", xlabel="training tokens", ylabel="load entropy / ln E",
                   series={v: [(e["tokens"], e["moe_ent"]) for e in evals if "moe_ent" in e] for v, evals in load.items()}),
              dict(title="max load over training", xlabel="training tokens", ylabel="max load / mean load - 1",
                   series={v: [(e["tokens"], e["moe_vio"]) for e in evals if "moe_vio" in e] for v, evals in load.items()})]
    lab.page("Dense vs Mixture-of-Experts at equal active parameters", body, svg_lines(panels, cols=3, width=340))
