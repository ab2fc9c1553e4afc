"""
Position schemes trained at context T and evaluated at 1x, 2x and 4x T; RoPE stretched by position
interpolation, NTK-aware scaling and YaRN.
"""
import sys

import torch
import torch.nn.functional as F

import data
from lab.charts import svg_lines
from lab.measure import table
from lab.runner import SHAKESPEARE, failed, model_of, quick_note, seeded
from lab.verdicts import claim, fmt, unexplained


@torch.no_grad()
def position_losses(ckpt_path, factor, scaling, windows):
    """Mean loss at each position 0 .. factor*T-1 of `windows` (N, 4T+1) val windows, for the model of a
    checkpoint stretched to factor x its block_size (RoPE angles rescaled by `scaling`). None when the
    weights cannot run that long (learned positions have no rows past T)."""
    ckpt = data.load_checkpoint(ckpt_path)
    trained, _ = data.model_from_checkpoint(ckpt)
    cfg = dict(ckpt["model_config"], block_size=factor * trained.config.block_size)
    if scaling != "none":
        cfg.update(rope_scaling=scaling, rope_factor=float(factor))
    module = sys.modules[type(trained).__module__]
    try:
        model = module.Model(module.Config(**cfg))
        model.load_state_dict(ckpt["model"])
    except (ValueError, RuntimeError):
        return None
    model.eval()
    L = factor * trained.config.block_size
    x, y = windows[:, :L], windows[:, 1:L + 1]  # (N, L) each
    total = torch.zeros(L)
    for i in range(0, x.size(0), 8):  # 8 windows per forward: bounded memory at 4T
        logits, _ = model(x[i:i + 8])
        total += F.cross_entropy(logits.transpose(1, 2), y[i:i + 8], reduction="none").sum(0)  # (L,)
    return total / x.size(0)


def fine_tuned(lab, rope_runs, length):
    """{scaling: [Run per seed]}: each RoPE run continued at `length` (twice its own) with PI and with YaRN."""
    steps = 4 if lab.quick else 200
    args = ["--dataset=pydoc" if lab.quick else "--dataset=shakespeare_char", f"--block_size={length}", "--rope_factor=2.0",
            f"--max_iters={steps}", f"--eval_interval={steps}", f"--log_interval={steps}", "--eval_iters=1" if lab.quick else "--eval_iters=20",
            "--batch_size=4" if lab.quick else "--batch_size=6", "--lr=1e-4", "--min_lr=1e-5", f"--warmup_iters={steps // 10}"]
    jobs = [(f"rope-{scaling}-ft-{r.dir.name.rsplit('-', 1)[1]}", [*args, f"--rope_scaling={scaling}",
                                                                  f"--init_from={r.dir / 'ckpt_last.pt'}"])
            for scaling in ("pi", "yarn") for r in rope_runs if r.ok]
    done = lab.train(jobs)
    return {scaling: [run for name, run in done.items() if name.startswith(f"rope-{scaling}-")] for scaling in ("pi", "yarn")}


def positions(lab):
    """position schemes trained at context T, evaluated at 1x, 2x, 4x T (loss beyond T apart); RoPE PI/NTK/YaRN"""
    schemes = [("learned", "learned (GPT-2)"), ("sinusoidal", "sinusoidal (Vaswani et al.)"), ("rope", "RoPE"),
               ("alibi", "ALiBi"), ("none", "none (NoPE)")]
    if lab.quick:
        schemes = [s for s in schemes if s[0] in ("learned", "rope", "alibi")]
    train_args = SHAKESPEARE + ["--max_iters=1200", "--eval_interval=400", "--n_kv_head=4"]
    runs = seeded(lab, [(key, train_args + [f"--pos={key}"]) for key, _ in schemes])
    T = model_of(train_args, lab.quick).config.block_size
    tuned = fine_tuned(lab, runs["rope"], 2 * T)
    val = data.TextData("pydoc" if lab.quick else "shakespeare_char", lab.data_dir).val
    n_windows = 16 if lab.quick else 128
    gen = torch.Generator().manual_seed(0)  # the same windows for every model
    start = torch.randint(len(val) - 4 * T - 1, (n_windows,), generator=gen)
    windows = val[start[:, None] + torch.arange(4 * T + 1)]  # (N, 4T+1)
    rows_def = [(key, label, "none") for key, label in schemes]
    at = next(i for i, (key, _, _) in enumerate(rows_def) if key == "rope") + 1  # PI and NTK right after RoPE
    rows_def[at:at] = [("rope", "RoPE + position interpolation (PI)", "pi"), ("rope", "RoPE + NTK-aware scaling", "ntk"),
                       ("rope", "RoPE + YaRN (NTK-by-parts, temperature)", "yarn")]
    rows, curves, beyond, firsts = [], {}, {}, {}  # beyond[label, f]: each seed's mean loss on positions T..fT-1
    for key, label, scaling in rows_def:
        per_factor = {}
        for f in (1, 2, 4):
            got = [position_losses(r.dir / "ckpt_last.pt", f, scaling, windows) for r in runs[key] if r.ok]
            per_factor[f] = None if not got or got[0] is None else torch.stack(got)  # (seeds, fT)
        cells = [label + failed(runs[key])]
        for f in (1, 2, 4):
            p = per_factor[f]
            if p is None:
                cells += ["cannot run past T: no learned embedding for those positions" if key == "learned" else "n/a", "-"]
                continue
            if f == 1:
                cells.append(fmt(p[:, :T].mean(1).tolist()))
            else:
                beyond[label, f] = p[:, T:].mean(1).tolist()
                if f == 2:
                    firsts[label] = p[:, :T].mean(1).tolist()  # the first T positions at 2x
                cells += [fmt(p[:, :T].mean(1).tolist()), fmt(beyond[label, f])]
        rows.append(cells)
        longest = next((per_factor[f] for f in (4, 2, 1) if per_factor[f] is not None), None)
        if longest is not None:
            bucket = max(1, T // 8)
            mean = longest.mean(0)
            curves[label] = [(i + bucket / 2, mean[i:i + bucket].mean().item()) for i in range(0, mean.numel(), bucket)]
    for scaling, label in (("pi", "RoPE + PI, fine-tuned at 2T"), ("yarn", "RoPE + YaRN, fine-tuned at 2T")):  # names below
        got = [position_losses(r.dir / "ckpt_last.pt", 1, "none", windows) for r in tuned[scaling] if r.ok]  # its own 2T
        p = torch.stack(got) if got else None  # (seeds, 2T)
        beyond[label, 2] = p[:, T:].mean(1).tolist() if p is not None else []
        rows.append([label + failed(tuned[scaling]), "-", *([fmt(p[:, :T].mean(1).tolist()), fmt(beyond[label, 2])]
                                                            if p is not None else ["n/a", "n/a"]), "-", "-"])
    names = {**{key: label for key, label, scaling in rows_def if scaling == "none"},
             **{scaling: label for _, label, scaling in rows_def if scaling != "none"},
             "pi-ft": "RoPE + PI, fine-tuned at 2T", "yarn-ft": "RoPE + YaRN, fine-tuned at 2T"}
    lines = position_claims(beyond, T, names)
    pi_note = ""
    if any("position interpolation without" in l and l.endswith("**disagrees**") for l in lines):
        pi_note = (f"Why PI without fine-tuning loses to plain RoPE here: at 2x it raises the loss already on the first T "
                   f"positions, where no position is new ({fmt(firsts[names['pi']])} against plain RoPE's "
                   f"{fmt(firsts[names['rope']])}), so the cost comes from interpolating, not from the length. PI divides "
                   f"every rotation angle by the factor, the fast ones that tell neighbouring characters apart too; "
                   f"NTK-aware scaling, which leaves the fast rotations nearly as trained, keeps those positions at "
                   f"{fmt(firsts[names['ntk']])}. Chen et al. stretch models trained at 2048 tokens, where plain "
                   f"extrapolation fails far worse than it does at T = {T} here; that difference of regime is untested.")
    header = ["positions", f"1x: 0..{T - 1}", f"2x: 0..{T - 1}", f"2x: {T}..{2 * T - 1}", f"4x: 0..{T - 1}",
              f"4x: {T}..{4 * T - 1}"]
    body = quick_note(lab) + f"""
How well does each position scheme work at the trained context T = {T}, and past it? Press et al. (2021,
ALiBi) report that sinusoidal and rotary positions degrade quickly beyond the training length while ALiBi
extrapolates; learned absolute positions (GPT-2) have no embedding past T at all. Models without positional
information (NoPE) still learn order from the causal mask (Haviv et al. 2022; Kazemnejad et al. 2023, who also
report better length generalisation than the explicit schemes). For RoPE, position interpolation (Chen et al.
2023), NTK-aware base scaling (bloc97 2023) and YaRN (Peng et al. 2023: NTK-by-parts, with a softmax
temperature) stretch the rotation angles at evaluation time without retraining; Chen et al. and Peng et al.
fine-tune after stretching: the two "fine-tuned at 2T" rows continue each RoPE checkpoint at 2T with PI or YaRN
(`train.py --init_from`, a short run at the trained learning rate's tenth) and are evaluated at their own 2T.

Each scheme trained on tiny Shakespeare (characters; config/shakespeare_char.py with MHA and the flag in the
row), {len(runs['rope'])} seed(s). The trained checkpoint (last step) is then evaluated in this process at 1x, 2x
and 4x T on the same {n_windows} validation windows: mean loss on the first T positions and, separately, on the
positions beyond T (so they are not diluted by the first T). PI, NTK and YaRN rows reuse the RoPE checkpoints, with
the angles rescaled by the evaluation factor (1x is plain RoPE). Mean ± standard deviation over seeds (n).

{table(header, rows)}

What this shows: the loss per position range of each scheme at and beyond the trained length, on one small
character-level model. What it does not show: long-context ability (a character model needs little far context),
or PI/YaRN after the fine-tuning budgets of their papers (this one is far shorter).

The papers' claims, checked on the loss at the positions beyond T (a difference counts when it exceeds 2 standard
errors):

""" + "\n".join(lines) + "\n\n" + " ".join(x for x in (pi_note, unexplained(lines, ["position interpolation without"])) if x) + "\n"
    lab.page("Positions: trained at T, evaluated at 1x, 2x, 4x T", body,
             svg_lines([dict(title=f"loss against position (longest evaluation; trained at T = {T})", xlabel="position",
                             ylabel="val loss", series=curves, marks=[(T, f"trained length T = {T}")])],
                       width=720, height=340, cols=1))


def position_claims(beyond, T, names):
    """Claim lines on the loss beyond the trained length (at 2T unless said); a row that was not run is not measured."""
    get = lambda key, f=2: beyond.get((names.get(key), f), [])
    where = f"Transformer trained at T = {T} on tiny Shakespeare characters, loss at positions T..2T-1"
    return [
        claim(f"{where}: ALiBi extrapolates better than sinusoidal positions (Press et al. 2021)", "ALiBi", get("alibi"),
              "sinusoidal", get("sinusoidal"), "<"),
        claim(f"{where}: ALiBi extrapolates better than RoPE (Press et al. 2021)", "ALiBi", get("alibi"), "RoPE",
              get("rope"), "<"),
        claim(f"{where}: no positional encoding extrapolates better than RoPE (Kazemnejad et al. 2023)", "NoPE",
              get("none"), "RoPE", get("rope"), "<"),
        claim(f"{where}: position interpolation without fine-tuning beats plain RoPE (Chen et al. 2023)", "PI", get("pi"),
              "RoPE", get("rope"), "<"),
        claim(f"{where}: YaRN without fine-tuning beats PI without fine-tuning (Peng et al. 2023)", "YaRN", get("yarn"),
              "PI", get("pi"), "<"),
        claim(f"{where}: a short fine-tune at 2T improves PI (Chen et al. 2023)", "PI fine-tuned", get("pi-ft"),
              "PI", get("pi"), "<"),
        claim(f"{where}: after the same fine-tune YaRN beats PI (Peng et al. 2023)", "YaRN fine-tuned", get("yarn-ft"),
              "PI fine-tuned", get("pi-ft"), "<")]
