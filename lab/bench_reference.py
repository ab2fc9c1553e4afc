"""
Decoding speed beside the reference: a GPT-2-124M-sized model (random weights) generating greedily with
model_transformer's KV cache, and the same weights in Hugging Face transformers' GPT2LMHeadModel with
its own generate (and its own cache), in one process, rounds interleaved.

    OMP_NUM_THREADS=1 python -m lab.bench reference [--prompt=16] [--new=64] [--rounds=3]
"""
import statistics
import tempfile
import time

import torch

import pretrained


def bench_reference(args):
    try:
        import transformers
    except ImportError:
        print("reference: skipped, transformers is not installed (pip install transformers)")
        return
    prompt, new, rounds = int(args.get("prompt", 16)), int(args.get("new", 64)), int(args.get("rounds", 3))
    torch.manual_seed(0)
    ref = transformers.GPT2LMHeadModel(transformers.GPT2Config()).eval()  # GPT-2 small's shape: 124M parameters
    with tempfile.TemporaryDirectory() as folder:  # the same weights, through the loader
        ref.save_pretrained(folder)
        _, ours = pretrained.load_model(folder)
    ours.eval()
    idx = torch.randint(0, 50257, (1, prompt))

    def ours_generate():
        return torch.cat(list(ours.generate(idx, new, temperature=0)), dim=1)

    def ref_generate():
        return ref.generate(idx, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)[:, prompt:]

    same = torch.equal(ours_generate(), ref_generate())  # also the warm-up
    runs = {"model_transformer.generate (KV cache)": ours_generate, "transformers generate (its cache)": ref_generate}
    secs = {name: [] for name in runs}
    with torch.no_grad():
        for _ in range(rounds):
            for name, fn in runs.items():
                t0 = time.process_time()  # CPU time of this process: what others on a shared machine disturb least
                fn()
                secs[name].append(time.process_time() - t0)
    base = statistics.median(secs["transformers generate (its cache)"])
    print(f"\ngreedy decoding, GPT-2 124M shape ({ours.num_params() / 1e6:.1f}M parameters, random weights), batch 1, "
          f"{prompt}-token prompt + {new} new tokens, {torch.get_num_threads()} thread(s), torch {torch.__version__}, "
          f"transformers {transformers.__version__}; median of {rounds} rounds, CPU time")
    print("| generate | tokens/s | s per call | vs transformers |\n|---|---|---|---|")
    for name, t in secs.items():
        m = statistics.median(t)
        print(f"| {name} | {new / m:.1f} | {m:.2f} | {base / m:.2f}x |")
    print(f"same greedy tokens: {'yes' if same else 'NO'}")

