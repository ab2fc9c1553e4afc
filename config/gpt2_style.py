# The GPT-2 architecture: learned absolute positions, LayerNorm, GELU MLP,
# multi-head attention (one K/V head per query head), pre-norm, tied embeddings.
pos = "learned"
norm = "layernorm"
bias = False  # nanoGPT trains its Shakespeare recipe without biases; GPT-2 itself had them
ffn = "gelu"
n_kv_head = 4  # = n_head: MHA
