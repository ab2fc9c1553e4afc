"""
The ladder: GPT-2 to a modern LLaMA-style block one change at a time (cumulative), and each change
alone on GPT-2 style.
"""
from lab.charts import svg_bars
from lab.measure import table
from lab.runner import GPT2, SHAKESPEARE, cpu_ms_per_step, failed, final_val, kv_bytes_per_token, mean_spread, model_of, \
    quick_note, seeded


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
    ladder_page(lab, steps, "The ladder: GPT-2 to modern, one change at a time", """Cumulative: each row
below GPT-2 style adds one change to the row above it, all with GPT-2's initialisation (N(0, 0.02), tied
embeddings); the last row then switches to this repository's default initialisation (PyTorch's defaults, untied
head), which is the modern default model exactly. Each change alone (MQA among them) and the original
Transformer's ReLU feed-forward are `python -m lab.experiments ladder_alone`; MHA, GQA and MQA side by side at the
modern recipe are `python -m lab.experiments attention`. (Six rows at two seeds fill the 15-minute budget.)""")


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
    ladder_page(lab, steps, "The ladder, each change alone on GPT-2 style", """Each row changes one thing,
alone, in GPT-2 style: which of them helps on its own, and which only together (`python -m lab.experiments
ladder` adds them one after the other, GQA 4:2 among them). The rows GPT-2 style and + RoPE are the same runs as
in the ladder.""")


def ladder_page(lab, steps, title, order):
    evals = ["--eval_interval=500"]  # five evaluations instead of nine: the budget goes to training steps
    runs = seeded(lab, [(key, args + evals) for key, _, args in steps])
    models = {key: model_of(args, lab.quick) for key, _, args in steps}
    ms = cpu_ms_per_step(models, lab.quick)
    base = sum(final_val(runs["gpt2"])) / len(runs["gpt2"])
    rows, bars = [], []
    for key, label, _ in steps:
        v = final_val(runs[key])
        mean = sum(v) / len(v)
        spread = (max(v) - min(v)) / 2 if len(v) > 1 else 0.0
        rows.append([label + failed(runs[key]), mean_spread(v), f"{mean - base:+.3f}", f"{models[key].num_params():,}",
                     f"{ms[key]:.1f}", f"{kv_bytes_per_token(models[key]):,}"])
        bars.append((label, mean, spread))
    m = models["gpt2"].config
    shape = f"{m.n_layer} layers, {m.n_head} heads, width {m.d_model}, context {m.block_size}"
    n_iter = runs["gpt2"][0].final.get("iter", "?")
    body = quick_note(lab) + f"""
Does each change from GPT-2 (Radford et al. 2019) to the LLaMA recipe (Touvron et al. 2023) lower the
loss at a fixed budget, and what does it cost? The changes: rotary positions (RoPE, Su et al. 2021), RMSNorm
(Zhang & Sennrich 2019), the SwiGLU feed-forward (Shazeer 2020, which reports lower perplexity than ReLU
and GELU at equal parameters), and grouped-query / multi-query attention (Ainslie et al. 2023; Shazeer 2019),
which shrink the KV cache at a small quality cost. {order}

Tiny Shakespeare, characters, {shape}, batch 12, {n_iter} iterations (nanoGPT's CPU recipe,
config/shakespeare_char.py; GPT-2 style adds config/gpt2_style.py), {len(runs['gpt2'])} seed(s) per row.
Val loss: the final evaluation (20 batches), mean ± half the range over seeds. CPU ms/step: one training step
(batch 12) of every model measured side by side in this process, rounds interleaved, in CPU process time
(the machine may be shared: compare rows, not machines). KV cache: float32 bytes per token of context, all
layers.

{table(["model", "val loss", "vs GPT-2 style", "parameters", "CPU ms/step", "KV cache bytes/token"], rows)}

What this shows: the loss of each step at this one small budget, and the measured cost per step; the KV
cache column is arithmetic (2 x layers x K/V heads x head dim x 4 bytes). What it does not show: whether an
ordering holds at scale or longer training, or differences smaller than the spread between seeds.

<!-- lead: interpretation -->
"""
    lab.page(title, body,
             svg_bars(f"final val loss, {shape}, {n_iter} iterations (whisker: half the range over seeds)",
                      "val loss", bars))
