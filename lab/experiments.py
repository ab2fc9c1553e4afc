"""
Experiments: each idea of the course switched on with a flag and measured, one command each.

    python -m lab.experiments --help              # the experiments, one line each
    python -m lab.experiments ladder              # the full run (about 20 min or less on 2 CPU cores)
    python -m lab.experiments ladder --quick      # a minute: the same code on a tiny budget
    python -m lab.experiments ladder --seeds=3 --out=results

Every experiment trains through train.py itself (one process per run, OMP_NUM_THREADS=1, --jobs
runs at once) and reads the runs' metrics.jsonl, or, where it looks inside a model while it trains or
times models side by side (attn_scale, inspect, context_cost), trains and measures in this process. It
writes OUT/NAME.md (the tables, the exact commands, the machine, the wall time) and OUT/NAME.svg (a
picture), and prints the tables. The claim experiments (selectivity, balance, attn_scale, context_cost,
inspect) are meant for --seeds=3 and print each claim's verdict computed from their own table.
A run whose directory already holds a finished run with the same arguments, trained by the same code
(lab.runner.code_hash: the model file, kernels.py, train.py, data.py, cli.py), is read, not redone:
an interrupted experiment picks up where it stopped. Runs live in OUT/runs/NAME/ (not committed;
ladder_alone reads and writes OUT/runs/ladder/, mqar OUT/runs/recall/: they share runs).
"""
import sys

from cli import UsageError, die, read_args, typed
from lab import architectures, attention, ladder, moe, norms, positions, recall, scaling
from lab import attn_scale, balance, context_cost, inspection, selectivity
from lab.runner import DEFAULT_SEEDS, Lab

# name: (function, run folder, first seed). The first line of the function's docstring is its --help line.
# Experiments that share a run folder read each other's runs: a run with the same label and arguments is
# trained once (labels of runs with other arguments differ, so nothing is overwritten). --seeds=n runs the
# seeds first, first + 1, ... first + n - 1 (Lab.seed_values); the first seeds are the ones the committed
# pages were run with. None: one run per configuration at train.py's default seed (1337), no --seed flag.
EXPERIMENTS = {
    "architectures": (architectures.architectures, "architectures", 0),
    "recall": (recall.recall, "recall", 1337),
    "mqar": (recall.mqar, "recall", 1337),
    "mqar_state": (recall.mqar_state, "mqar_state", 1337),
    "induction_heads": (recall.induction_heads, "induction_heads", 1337),
    "moe": (moe.moe, "moe", 1337),
    "scaling": (scaling.scaling, "scaling", 0),
    "ladder": (ladder.ladder, "ladder", 0),
    "ladder_alone": (ladder.ladder_alone, "ladder", 0),
    "positions": (positions.positions, "positions", 0),
    "norms": (norms.norms, "norms", 0),
    "attention": (attention.attention, "attention", 0),
    "selectivity": (selectivity.selectivity, "selectivity", 0),
    "balance": (balance.balance, "balance", 0),
    "inspect": (inspection.inspect_models, "inspect", 0),
    "attn_scale": (attn_scale.attn_scale, "attn_scale", 0),
    "context_cost": (context_cost.context_cost, "context_cost", 0),
}

OPTIONS = {
    "quick": (False, "a tiny budget (about a minute): checks the code path, not the claim"),
    "seeds": (DEFAULT_SEEDS, "seeds per configuration"),
    "out": ("results", "where NAME.md and NAME.svg go (runs in OUT/runs/NAME/)"),
    "jobs": (2, "training runs at once (one thread each)"),
    "data_dir": ("data", "train.py's --data_dir"),
    "device": ("auto", "train.py's --device (passed on when not auto)"),
}


def main(argv):
    if not argv or "-h" in argv or "--help" in argv:
        print(__doc__.strip(), "\n\nexperiments:")
        for name, (fn, _, _) in EXPERIMENTS.items():
            print(f"  {name:<12} {fn.__doc__.strip().splitlines()[0]}")
        print("\noptions:")
        for name, (default, text) in OPTIONS.items():
            print(f"  {f'--{name}={default}':<22} {text}")
        return
    try:
        name, rest = argv[0], argv[1:]
        if name not in EXPERIMENTS:
            raise UsageError(f"unknown experiment {name!r}; choose from {', '.join(EXPERIMENTS)}")
        given = typed(read_args(rest), {k: type(v) for k, (v, _) in OPTIONS.items()}, script="-m lab.experiments")
        opts = {k: given.get(k, v) for k, (v, _) in OPTIONS.items()}
        if opts["seeds"] < 1 or opts["jobs"] < 1:
            raise UsageError("seeds and jobs must be >= 1")
    except UsageError as e:
        die(str(e))
    run, folder, first_seed = EXPERIMENTS[name]
    lab = Lab(name, opts, folder, first_seed)
    print(f"experiment {name}{' (quick)' if lab.quick else ''}: {lab.seeds} seed(s), {lab.jobs} run(s) at once, "
          f"out {lab.out}", flush=True)
    run(lab)


if __name__ == "__main__":
    main(sys.argv[1:])
