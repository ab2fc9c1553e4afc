"""
What every experiment's page shares: a spread over seeds as mean ± standard deviation with n; the one rule
that says whether a difference is above the noise; the verdict word a page prints beside a claim, computed
from the very numbers of its table, so prose and table cannot disagree; the README's table of those verdicts,
read back from the pages' claim lines; the same fixed validation batches for every model and seed; and a
small in-process training loop for the experiments that look inside a model while it trains.
"""
import math
import re
import sys
from pathlib import Path

import torch

import data

VERDICTS = ("confirmed", "disagrees", "no measurable difference", "not measured")


def mean_sd(values):
    """(mean, sample standard deviation, n) of the finite values; sd is nan for n < 2."""
    v = [x for x in values if x == x and math.isfinite(x)]
    n = len(v)
    mean = sum(v) / n if n else float("nan")
    sd = math.sqrt(sum((x - mean) ** 2 for x in v) / (n - 1)) if n > 1 else float("nan")
    return mean, sd, n


def fmt(values, spec=".3f"):
    """'0.950 ± 0.020 (n=3)'; one value: '0.950 (n=1)'; none: 'n/a'."""
    mean, sd, n = mean_sd(values)
    if n == 0:
        return "n/a"
    return f"{format(mean, spec)} ± {format(sd, spec)} (n={n})" if n > 1 else f"{format(mean, spec)} (n=1)"


def within_noise(a, b):
    """True when |mean(a) - mean(b)| <= 2 standard errors of the difference, sqrt(sd_a^2/n_a + sd_b^2/n_b);
    None when either side has fewer than 2 values (no spread: noise unknown)."""
    (ma, sa, na), (mb, sb, nb) = mean_sd(a), mean_sd(b)
    if na < 2 or nb < 2:
        return None
    return abs(ma - mb) <= 2 * math.sqrt(sa ** 2 / na + sb ** 2 / nb)  # <=: equal values without spread are no difference


def verdict(a, b, expect):
    """The claim "mean(a) > mean(b)" (expect='>') or "<" checked against the measurements: confirmed,
    disagrees, no measurable difference (within noise), or not measured (fewer than 2 seeds a side)."""
    noise = within_noise(a, b)
    if noise is None:
        return "not measured"
    if noise:
        return "no measurable difference"
    higher = mean_sd(a)[0] > mean_sd(b)[0]
    return "confirmed" if higher == (expect == ">") else "disagrees"


def claim(text, a_name, a, b_name, b, expect, spec=".3f"):
    """One line of a page: the claim, both measurements and the verdict computed from them (the names hold no
    colon: the README's table splits the line at its last one)."""
    assert ":" not in a_name + b_name, "a claim's measured side holds no colon"
    return (f"- {text}: {a_name} {fmt(a, spec)} against {b_name} {fmt(b, spec)} -> "
            f"**{verdict(a, b, expect)}**")


def unexplained(lines, explained=()):
    """The sentence a page prints for its claim lines that read 'disagrees' and whose reason it does not discuss
    (claims containing one of the `explained` phrases are left out): that their reason is untested. '' if none."""
    against = [m["claim"] for m in map(CLAIM_LINE.match, lines) if m and m["verdict"] == "disagrees"
               and not any(e in m["claim"] for e in explained)]
    if not against:
        return ""
    named = "; ".join(f'"{c.rsplit(": ", 1)[-1]}"' for c in against)  # the claim without its setting
    return f"Where a claim above reads disagrees ({named}), why is untested on this page."


# ----------------------------------------------------------------------------- fixed validation batches


def fixed_batches(dataset, n, batch_size, block_size, seed=0):
    """n (x, y) validation batches drawn once from a generator of their own: every model and every seed of
    an experiment is scored on these same tokens."""
    gen = torch.Generator().manual_seed(seed)
    return [dataset.batch("val", batch_size, block_size, gen) for _ in range(n)]


@torch.no_grad()
def score(model, batches):
    """(mean loss, accuracy on the scored targets) of a model on fixed batches; targets -1 are not scored."""
    model.eval()
    losses, right, scored = [], 0, 0
    for x, y in batches:
        logits, loss = model(x, y)
        losses.append(model.aux["ce"].item())  # the cross-entropy alone, without auxiliary losses
        right += (logits.argmax(-1) == y)[y != -1].sum().item()
        scored += (y != -1).sum().item()
    return sum(losses) / len(losses), right / max(1, scored)


def no_recall(dataset, batches):
    """Accuracy of the synthetic task's no-recall rule (SynthData.guess) on the answers of the fixed batches."""
    right = sum((dataset.guess(x)[:, None] == y)[y != -1].sum().item() for x, y in batches)
    return right / max(1, sum((y != -1).sum().item() for _, y in batches))


def score_run(run, batches):
    """(loss, accuracy) of a finished train.py run's last checkpoint on fixed batches; (nan, nan) if it failed."""
    if not run.ok:
        return float("nan"), float("nan")
    model, _ = data.model_from_checkpoint(data.load_checkpoint(run.dir / "ckpt_last.pt"))
    return score(model, batches)


# ----------------------------------------------------------------------------- in-process training


def train_in_process(model, dataset, steps, batch_size, lr, seed, probe=None, every=0, warmup=0):
    """AdamW (weight decay 0.1 on the model's decay group), linear warmup then constant lr, gradients clipped
    at 1.0 as train.py does; for experiments that must look inside the model while it trains. probe(step)
    runs at step 0 and every `every` steps and at the end; returns [(step, loss, grad norm before clipping)]."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    opt = torch.optim.AdamW(model.optim_groups(0.1), lr=lr, betas=(0.9, 0.95))
    history = []
    for step in range(steps + 1):
        if probe and (step == 0 or step == steps or (every and step % every == 0)):
            probe(step)
            model.train()
        if step == steps:
            break
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / max(1, warmup))
        x, y = dataset.batch("train", batch_size, model.config.block_size, gen)
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        history.append((step, loss.item(), norm.item()))
    return history


# ----------------------------------------------------------------------------- the README's verdict table

# the claim may hold colons ("MoE, top-2 of 8: ..."); the measured part, written by `claim`, holds none
CLAIM_LINE = re.compile(r"^- (?P<claim>.+): (?P<measured>[^:]+) -> \*\*(?P<verdict>" + "|".join(VERDICTS) + r")\*\*$")
BEGIN, END = "<!-- verdicts: written by python -m lab.verdicts from the pages' claim lines -->", "<!-- /verdicts -->"


def page_claims(results):
    """[(page, claim, measured, verdict)] from every claim line (written by `claim`) of results/*.md."""
    rows = []
    for page in sorted(Path(results).glob("*.md")):
        for line in page.read_text().splitlines():
            m = CLAIM_LINE.match(line)
            if m:
                rows.append((page.name, m["claim"], m["measured"], m["verdict"]))
    return rows


def verdict_table(results):
    """The README's table: one row per claim line of the pages, in page order."""
    lines = ["| claim | measured (mean ± sd, n) | verdict | page |", "| --- | --- | --- | --- |"]
    for page, text, measured, word in page_claims(results):
        lines.append(f"| {text.replace('|', '/')} | {measured.replace('|', '/')} | {word} | [{page}](results/{page}) |")
    return "\n".join(lines)


def page_index(results):
    """The README's list of pages: title, the command that writes it, its wall time, and how it reports spread
    (read from the page: 'mean ± sd (n)' where its cells carry n, else the half range of an earlier protocol)."""
    lines = ["| page | what it measures | command | wall time | spread |", "| --- | --- | --- | --- | --- |"]
    for page in sorted(Path(results).glob("*.md")):
        text = page.read_text()
        title = text.splitlines()[0].lstrip("# ").strip()
        command = re.search(r"`?(python -m lab\.[^`\n)]+)", text)  # the first command the page names
        wall = re.search(r"wall time ([0-9.]+ min)", text)
        spread = ("mean ± sd (n)" if "(n=" in text else "one seed (earlier protocol)" if "--seeds=1" in text
                  else "one seed: a picture, no verdict" if "One seed: a picture" in text
                  else "± half the range of 2 seeds (earlier protocol)" if " ± " in text and wall else "timings")
        lines.append(f"| [{page.name}](results/{page.name}) | {title.replace('|', '/')} | "
                     f"{'`' + command[1].strip() + '`' if command else '-'} | {wall[1] if wall else '-'} | {spread} |")
    return "\n".join(lines)


def with_table(readme, results):
    """README text with the block between BEGIN and END replaced by the verdict table and the page index."""
    head, sep, rest = readme.partition(BEGIN)
    if not sep or END not in rest:
        raise SystemExit(f"README has no {BEGIN} ... {END} block")
    block = verdict_table(results) + "\n\nEvery page, with the command that rewrites it whole:\n\n" + page_index(results)
    return head + BEGIN + "\n" + block + "\n" + END + rest.partition(END)[2]


if __name__ == "__main__":  # python -m lab.verdicts [README] [RESULTS]: rewrite the README's verdict table
    readme = Path(sys.argv[1] if len(sys.argv) > 1 else "README.md")
    readme.write_text(with_table(readme.read_text(), sys.argv[2] if len(sys.argv) > 2 else "results"))
    print(f"wrote the verdict table of {readme} ({len(page_claims(sys.argv[2] if len(sys.argv) > 2 else 'results'))} claims)")
