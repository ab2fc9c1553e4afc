# nanoGPT's fine-tuning recipe: pretrained GPT-2 on tiny Shakespeare with GPT-2's own BPE, 20 steps of
# 32 sequences of 1024 tokens at a small constant learning rate.
#   python train.py config/finetune_shakespeare.py [--init_from=gpt2-xl]
init_from = "gpt2"  # a hub name (downloaded once) or a directory; gpt2-medium, -large, -xl (nanoGPT's choice) want a GPU
dataset = "shakespeare"
out_dir = "out-shakespeare"
batch_size = 1
grad_accum = 32
max_iters = 20
lr = 3e-5
min_lr = 3e-5  # constant: no decay over so few steps
warmup_iters = 0
eval_interval = 5
eval_iters = 40
