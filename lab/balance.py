"""
Load balancing in a Mixture of Experts: Switch's auxiliary loss on and off, DeepSeek-V3's sigmoid router
with a bias and no loss, and a capacity factor's drops and their cost in loss.
"""
from lab.charts import svg_lines
from lab.measure import table
from lab.runner import config_args, data_of
from lab.verdicts import claim, fixed_batches, fmt, mean_sd, score_run

VARIANTS = {  # label: model fields
    "softmax + balance loss (Switch)": dict(router="softmax", balance_coef=0.01),
    "softmax, no balance loss": dict(router="softmax", balance_coef=0.0),
    "sigmoid + bias, no loss (DeepSeek-V3)": dict(router="sigmoid"),
    "softmax + loss, capacity factor 1.25": dict(router="softmax", balance_coef=0.01, capacity_factor=1.25),
}
ON, OFF, SIGMOID, CAPACITY = VARIANTS


def balance(lab):
    """MoE load balancing: balance loss off vs on, sigmoid + bias vs softmax + loss, a capacity factor's drops"""
    run = dict(dataset="shakespeare_char", block_size=128, batch_size=16, max_iters=600, eval_interval=100, eval_iters=4,
               lr=2e-3, min_lr=2e-4, warmup_iters=50, d_model=64, n_layer=2, n_head=4, n_expert=8, top_k=2)
    n_val = 16
    if lab.quick:
        run.update(dataset="pydoc", block_size=32, batch_size=4, max_iters=4, eval_interval=2, eval_iters=1, warmup_iters=1,
                   d_model=32, n_layer=1)
        n_val = 2
    jobs, meta = [], {}
    for i, (label, fields) in enumerate(VARIANTS.items()):
        for seed in lab.seed_values():
            meta[f"v{i}-s{seed}"] = label
            jobs.append((f"v{i}-s{seed}", ["--model=moe", f"--seed={seed}", *config_args({**run, **fields}),
                                          f"--log_interval={run['eval_interval']}"]))
    results = lab.train(jobs)
    runs = {label: [r for name, r in results.items() if meta[name] == label] for label in VARIANTS}
    batches = fixed_batches(data_of(run["dataset"], lab.data_dir), n_val, run["batch_size"], run["block_size"])
    loss = {label: [score_run(r, batches)[0] for r in rs] for label, rs in runs.items()}
    last = lambda label, key: [r.final.get(key, float("nan")) for r in runs[label] if r.ok]
    rows = [[label, fmt(loss[label]), fmt(last(label, "moe_ent"), ".2f"), fmt(last(label, "moe_dead"), ".1f"),
             fmt(last(label, "moe_vio"), ".2f"), fmt(last(label, "moe_drop"), ".3f")] for label in VARIANTS]

    def over_training(key):  # mean over seeds at each evaluation
        out = {}
        for label, rs in runs.items():
            evals = [r.evals for r in rs if r.ok]
            if evals:
                steps = min(map(len, evals))
                out[label] = [(evals[0][i]["iter"], mean_sd([e[i].get(key, float("nan")) for e in evals])[0]) for i in range(steps)]
        return out
    tokens = run["max_iters"] * run["batch_size"] * run["block_size"]
    body = (f"An MoE Transformer ({run['n_layer']} layers, d_model {run['d_model']}, top-{run['top_k']} of "
            f"{run['n_expert']} experts in every layer) on `{run['dataset']}`, {run['max_iters']} iters x "
            f"{run['batch_size']} x {run['block_size']} tokens ({tokens / 1e6:.2f}M), lr {run['lr']}, {lab.seeds} seed(s) "
            f"each. Val loss (cross-entropy, without the auxiliary losses) on the same {n_val} fixed validation batches "
            f"for every model and seed; the load statistics are those of the last evaluation, the mean over the MoE "
            f"layers: load entropy / ln E (1 = uniform), experts that got no token (summed over layers), max load / mean "
            f"load - 1, the share of assignments dropped for capacity. Mean ± sd (n).\n\n"
            + table(["router", "val loss", "load entropy", "dead experts", "max violation", "dropped"], rows)
            + "\n\nThe claims (Shazeer et al. 2017 and Switch, Fedus et al. 2021: without a balancing term the router "
            "collapses onto a few experts; DeepSeek-V3, 2024: a bias that moves against the load balances without the "
            "loss's cost in quality; GShard and Switch: a capacity factor drops tokens, which costs quality), checked "
            "against the table (a difference counts when it exceeds 2 standard errors):\n\n"
            + "\n".join([
                claim("MoE, top-2 of 8: the balance loss evens the load (higher load entropy than without it)", "with", last(ON, "moe_ent"),
                      "without", last(OFF, "moe_ent"), ">", ".2f"),
                claim("MoE, top-2 of 8: without the balance loss more experts get no token", "without", last(OFF, "moe_dead"), "with",
                      last(ON, "moe_dead"), ">", ".1f"),
                claim("MoE, top-2 of 8: the balance loss costs validation loss (DeepSeek-V3's argument against it)", "with", loss[ON], "without", loss[OFF], ">"),
                claim("MoE, top-2 of 8: the sigmoid router with a bias and no loss reaches a lower loss than softmax with the balance loss", "sigmoid", loss[SIGMOID],
                      "softmax", loss[ON], "<"),
                claim("MoE, top-2 of 8: dropping tokens beyond a capacity factor of 1.25 costs validation loss", "capacity 1.25", loss[CAPACITY],
                      "dropless", loss[ON], ">")]))
    panels = [dict(title="load entropy / ln E", xlabel="iteration", ylabel="entropy", series=over_training("moe_ent")),
              dict(title="dead experts", xlabel="iteration", ylabel="experts", series=over_training("moe_dead")),
              dict(title="max load / mean load - 1", xlabel="iteration", ylabel="violation", series=over_training("moe_vio")),
              dict(title="validation loss", xlabel="iteration", ylabel="val loss", series=over_training("val_loss"))]
    lab.page("Load balancing: the balance loss, the sigmoid router's bias, capacity", body,
             svg_lines(panels, cols=2, width=380))
