# The GPT-2 architecture: learned absolute positions, LayerNorm, GELU MLP,
# multi-head attention (one K/V head per query head), pre-norm, tied embeddings, N(0, 0.02) init.
pos = "learned"
norm = "layernorm"
bias = False  # nanoGPT trains its Shakespeare recipe without biases; GPT-2 itself had them
ffn = "gelu"
n_kv_head = 4  # = n_head: MHA
tie_embeddings = True  # the head reuses the token embedding matrix
init = "gpt2"  # every matrix N(0, 0.02), out_proj scaled by 1/sqrt(2 * n_layer)
