# Tiny Shakespeare, character level, at nanoGPT's CPU shape (its README: val loss 1.88 after
# 2000 iterations with a GPT-2-style model). This preset keeps the modern default architecture;
# add config/gpt2_style.py after it for nanoGPT's architecture:
#   python train.py config/shakespeare_char.py config/gpt2_style.py
dataset = "shakespeare_char"
out_dir = "out-shakespeare-char"
block_size = 64
batch_size = 12
n_layer = 4
n_head = 4
d_model = 128
max_iters = 2000
lr = 1e-3
min_lr = 1e-4
warmup_iters = 100
eval_interval = 250
eval_iters = 20
dropout = 0.0
