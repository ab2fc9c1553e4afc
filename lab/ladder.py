"""
The ladder: GPT-2 to a modern LLaMA-style block one change at a time (cumulative), and each change
alone on GPT-2 style.
"""
from lab.charts import svg_bars
from lab.measure import table
from lab.runner import GPT2, SHAKESPEARE, cpu_ms_per_step, failed, fixed_val_losses, kv_bytes_per_token, model_of, \
    quick_note, seeded
from lab.verdicts import claim, fmt, mean_sd, unexplained, verdict

# train.py's own evaluations only at the start and the end, on 2 batches: the page scores every run on fixed
# batches of its own, so the budget goes to training steps
EVALS = ["--eval_interval=2000", "--eval_iters=2"]
# the rows' names in claim lines (a claim line's measured side holds no colon: no "4:2")
SHORT = {"gpt2": "GPT-2 style", "rope": "+ RoPE", "rmsnorm": "+ RoPE + RMSNorm", "swiglu": "+ RoPE + RMSNorm + SwiGLU",
         "gqa": "+ ... + GQA (2 K/V heads)", "relu": "ReLU", "rmsnorm-only": "RMSNorm alone", "swiglu-only": "SwiGLU alone",
         "mqa-only": "MQA alone (1 K/V head)"}


def ladder(lab):
    """GPT-2 to a modern LLaMA-style block, one change at a time (cumulative), on tiny Shakespeare"""
    modern = ["--pos=rope", "--norm=rmsnorm", "--ffn=swiglu"]
    steps = [("gpt2", "GPT-2 style (learned, LayerNorm, GELU, MHA)", GPT2),
             ("rope", "+ RoPE", GPT2 + ["--pos=rope"]),
             ("rmsnorm", "+ RoPE + RMSNorm", GPT2 + modern[:2]),
             ("swiglu", "+ RoPE + RMSNorm + SwiGLU", GPT2 + modern),
             ("gqa", "+ ... + GQA 4:2", GPT2 + modern + ["--n_kv_head=2"]),
             ("default", "+ ... + GQA 4:2 + PyTorch's init, untied head (this repository's default)", SHAKESPEARE)]
    if lab.quick:  # four rows: each train.py process costs seconds of start-up alone
        steps = [s for s in steps if s[0] in ("gpt2", "rope", "gqa", "default")]
    # (the change, the row with it, the row without it, the expected sign of with - without, the paper)
    claims = [("RoPE in place of learned absolute positions lowers the val loss", "rope", "gpt2", "<",
               "Su et al. 2021"),
              ("with RoPE, RMSNorm in place of LayerNorm costs loss", "rmsnorm", "rope", ">",
               "Zhang & Sennrich 2019 report the same quality"),
              ("with RoPE and RMSNorm, SwiGLU in place of the GELU feed-forward lowers the val loss at equal parameters",
               "swiglu", "rmsnorm", "<", "Shazeer 2020"),
              ("with RoPE, RMSNorm and SwiGLU, GQA 4:2 in place of MHA costs loss", "gqa", "swiglu", ">",
               "Ainslie et al. 2023 report GQA close to MHA")]
    ladder_page(lab, steps, claims, "The ladder: GPT-2 to modern, one change at a time", """Cumulative: each row
below GPT-2 style adds one change to the row above it, all with GPT-2's initialisation (N(0, 0.02), tied
embeddings); the last row then switches to this repository's default initialisation (PyTorch's defaults, untied
head), which is the modern default model exactly. Each change alone (MQA among them) and the original
Transformer's ReLU feed-forward are `python -m lab.experiments ladder_alone`; MHA, GQA and MQA side by side at the
modern recipe are `python -m lab.experiments attention`.""", cumulative=True)


def ladder_alone(lab):
    """each step of the ladder alone on GPT-2 style (ReLU, RoPE, RMSNorm, SwiGLU, MQA), tiny Shakespeare"""
    steps = [("gpt2", "GPT-2 style (learned, LayerNorm, GELU, MHA)", GPT2),
             ("relu", "ReLU instead of GELU (original Transformer)", GPT2 + ["--ffn=relu"]),
             ("rope", "+ RoPE only", GPT2 + ["--pos=rope"]),
             ("rmsnorm-only", "+ RMSNorm only", GPT2 + ["--norm=rmsnorm"]),
             ("swiglu-only", "+ SwiGLU only", GPT2 + ["--ffn=swiglu"]),
             ("mqa-only", "+ MQA 4:1 only", GPT2 + ["--n_kv_head=1"])]
    if lab.quick:
        steps = [s for s in steps if s[0] in ("gpt2", "swiglu-only", "mqa-only")]
    # RoPE alone is the ladder's own first step (the same runs): its claim line is on the ladder's page
    claims = [("the GELU feed-forward (GPT-2) reaches a lower val loss than ReLU (the original Transformer)", "gpt2",
               "relu", "<", "Hendrycks & Gimpel 2016"),
              ("RMSNorm alone in place of LayerNorm costs loss", "rmsnorm-only", "gpt2", ">",
               "Zhang & Sennrich 2019 report the same quality"),
              ("SwiGLU alone in place of GELU lowers the val loss at equal parameters", "swiglu-only", "gpt2", "<",
               "Shazeer 2020"),
              ("SwiGLU reaches a lower val loss than ReLU at equal parameters", "swiglu-only", "relu", "<", "Shazeer 2020"),
              ("MQA 4:1 alone in place of MHA costs loss", "mqa-only", "gpt2", ">",
               "Shazeer 2019; Ainslie et al. 2023 report a small cost")]
    ladder_page(lab, steps, claims, "The ladder, each change alone on GPT-2 style", """Each row changes one thing,
alone, in GPT-2 style: which of them helps on its own, and which only together (`python -m lab.experiments
ladder` adds them one after the other, GQA 4:2 among them). The rows GPT-2 style and + RoPE are the same runs as
in the ladder (one run folder); the claim that RoPE lowers the loss is on the ladder's page.""", cumulative=False)


def gelu_note(verdict_word):
    """What the page says about GELU against ReLU, by the verdict its claim line got."""
    if verdict_word != "disagrees":
        return ""
    return ("\n\nGELU against ReLU disagrees with Hendrycks & Gimpel (2016), where GELU matches or beats ReLU (and with "
            "Shazeer 2020 in T5, at far longer training). Why is untested here. A hypothesis: with GPT-2's N(0, 0.02) "
            "weights the feed-forward's pre-activations have a standard deviation near 0.2, where GELU is close to the "
            "linear x/2, so the feed-forward starts almost linear, while ReLU is non-linear at any scale; a ReLU/GELU "
            "pair at PyTorch's default initialisation would test it and is not run (it would not fit the time budget).")


def ladder_page(lab, steps, claims, title, order, cumulative):
    runs = seeded(lab, [(key, args + EVALS) for key, _, args in steps])
    loss, scored_on = fixed_val_losses(lab, runs)
    models = {key: model_of(args, lab.quick) for key, _, args in steps}
    ms = cpu_ms_per_step(models, lab.quick)
    mean = {key: mean_sd(v)[0] for key, v in loss.items()}
    rows, bars = [], []
    for i, (key, label, _) in enumerate(steps):
        above = [f"{mean[key] - mean[steps[i - 1][0]]:+.3f}" if i else ""] if cumulative else []
        rows.append([label + failed(runs[key]), fmt(loss[key]), *above, f"{mean[key] - mean['gpt2']:+.3f}",
                     f"{models[key].num_params():,}", f"{ms[key]:.1f}", f"{kv_bytes_per_token(models[key]):,}"])
        m, sd, n = mean_sd(loss[key])
        bars.append((label, m, sd if n > 1 else 0))
    m = models["gpt2"].config
    shape = f"{m.n_layer} layers, {m.n_head} heads, width {m.d_model}, context {m.block_size}"
    n_iter = runs["gpt2"][0].final.get("iter", "?")
    corpus = "the built-in corpus" if lab.quick else "tiny Shakespeare characters"
    setting = f"Transformer, {corpus}, {m.n_layer} layers x width {m.d_model}, {n_iter} iterations, GPT-2 style init"
    lines = [claim(f"{setting}: {text} ({paper})", SHORT[a], loss[a], SHORT[b], loss[b], expect)
             for text, a, b, expect, paper in claims if a in loss and b in loss]
    gelu = [verdict(loss["gpt2"], loss["relu"], "<")] if "relu" in loss else []
    head = ["model", "val loss", *(["vs row above"] if cumulative else []), "vs GPT-2 style", "parameters", "CPU ms/step",
            "KV cache bytes/token"]
    body = quick_note(lab) + f"""
Does each change from GPT-2 (Radford et al. 2019) to the LLaMA recipe (Touvron et al. 2023) lower the
loss at a fixed budget, and what does it cost? The changes: rotary positions (RoPE, Su et al. 2021), RMSNorm
(Zhang & Sennrich 2019), the SwiGLU feed-forward (Shazeer 2020, which reports lower perplexity than ReLU
and GELU at equal parameters), and grouped-query / multi-query attention (Ainslie et al. 2023; Shazeer 2019),
which shrink the KV cache at a small quality cost. {order}

Tiny Shakespeare, characters, {shape}, batch 12, {n_iter} iterations (nanoGPT's CPU recipe,
config/shakespeare_char.py; GPT-2 style adds config/gpt2_style.py), {len(runs['gpt2'])} seed(s) per row.
Val loss: {scored_on}; mean ± sd (n seeds). The differences are of the means. CPU ms/step: one training
step (batch 12) of every model measured side by side in this process, rounds interleaved, in CPU process time
(the machine may be shared: compare rows, not machines). KV cache: float32 bytes per token of context, all
layers (arithmetic: 2 x layers x K/V heads x head dim x 4 bytes).

{table(head, rows)}

Checked against the table (a difference counts when it exceeds 2 standard errors; a claim that a change costs
loss reads **no measurable difference** where a paper's "the same quality" holds at this budget):

{chr(10).join(lines) if lines else "(no pair of rows of a claim in this mode)"}{gelu_note(gelu[0]) if gelu else ""}

{unexplained(lines, ["GELU feed-forward (GPT-2) reaches a lower val loss than ReLU"])}

What this shows: the loss of each step at this one small budget, and the measured cost per step. What it does
not show: whether an ordering holds at scale or at longer training, or differences smaller than the spread
between seeds.
"""
    lab.page(title, body,
             svg_bars(f"val loss, {shape}, {n_iter} iterations (whisker: sd over seeds)", "val loss", bars))
