"""
Hugging Face checkpoints in this repository's model files: GPT-2 (every size) in
model_transformer.py, the Llama family (Llama, Mistral without a sliding window, SmolLM2,
TinyLlama, ...) in model_transformer.py, the Mixtral family in model_moe.py, Mamba in
model_mamba.py, Jamba in model_hybrid.py.

    name, model = load_model("gpt2")                   # a hub name: downloaded once, then cached
    name, model = load_model("path/to/dir")            # config.json + *.safetensors
    spec = tokenizer_spec("path/to/dir")               # for data.Tokenizer: tiktoken's GPT-2, or tokenizer.json

The model files are not changed to fit a checkpoint: config.json becomes a Config, and each
tensor is renamed (and, where the layouts differ, transposed or concatenated) into the model's own
parameter. A config field that the model file cannot honour is refused with its name, never
approximated: the loaded model computes what the checkpoint's authors trained, or nothing.
Every parameter of the model must be filled and every tensor of the checkpoint used.
"""
import json
import math
from pathlib import Path

import torch

from cli import MODELS, UsageError, one_line
from data import bpe_spec

# ----------------------------------------------------------------------------- the names, per architecture
# A row: (our parameter, the checkpoint tensors it is made of, how). {i} is the layer, {e} the expert;
# {e} on the right only means the experts are stacked into one of our tensors.
keep = lambda ts: ts[0]
transpose = lambda ts: ts[0].t()  # GPT-2's Conv1D stores (in, out), nn.Linear (out, in)
cat = lambda ts: torch.cat(ts)  # q, k, v -> qkv; gate, up -> gate_up (ours are one matmul each)
experts_in = lambda ts: torch.stack([torch.cat(w).t() for w in ts])  # E x [gate (F, C), up (F, C)] -> (E, C, 2F)
experts_out = lambda ts: torch.stack([w[0].t() for w in ts])  # E x [down (C, F)] -> (E, F, C)

ATTN = lambda a, p: [  # Llama's attention names, shared by Mixtral and Jamba; a: ours, p: theirs
    (f"blocks.{{i}}.{a}.qkv.weight", [f"{p}.{x}_proj.weight" for x in "qkv"], cat),
    (f"blocks.{{i}}.{a}.out_proj.weight", [f"{p}.o_proj.weight"], keep)]
MAMBA = lambda a, p, extra=(): [(f"blocks.{{i}}.{a}.{x}", [f"{p}.{x}"], keep) for x in (
    "in_proj.weight", "conv1d.weight", "conv1d.bias", "x_proj.weight", "dt_proj.weight", "dt_proj.bias", "A_log", "D",
    "out_proj.weight", *extra)]

TABLES = {
    "gpt2": {  # keys without the "transformer." that some checkpoints put in front
        "model": [("wte.weight", ["wte.weight"], keep), ("wpe.weight", ["wpe.weight"], keep),
                  ("norm_f.weight", ["ln_f.weight"], keep), ("norm_f.bias", ["ln_f.bias"], keep)],
        "layer": [("blocks.{i}.norm1.weight", ["h.{i}.ln_1.weight"], keep), ("blocks.{i}.norm1.bias", ["h.{i}.ln_1.bias"], keep),
                  ("blocks.{i}.attn.qkv.weight", ["h.{i}.attn.c_attn.weight"], transpose),  # q, k, v side by side, as ours
                  ("blocks.{i}.attn.qkv.bias", ["h.{i}.attn.c_attn.bias"], keep),
                  ("blocks.{i}.attn.out_proj.weight", ["h.{i}.attn.c_proj.weight"], transpose),
                  ("blocks.{i}.attn.out_proj.bias", ["h.{i}.attn.c_proj.bias"], keep),
                  ("blocks.{i}.norm2.weight", ["h.{i}.ln_2.weight"], keep), ("blocks.{i}.norm2.bias", ["h.{i}.ln_2.bias"], keep),
                  ("blocks.{i}.ffn.fc.weight", ["h.{i}.mlp.c_fc.weight"], transpose),
                  ("blocks.{i}.ffn.fc.bias", ["h.{i}.mlp.c_fc.bias"], keep),
                  ("blocks.{i}.ffn.out_proj.weight", ["h.{i}.mlp.c_proj.weight"], transpose),
                  ("blocks.{i}.ffn.out_proj.bias", ["h.{i}.mlp.c_proj.bias"], keep)]},
    "llama": {
        "model": [("wte.weight", ["model.embed_tokens.weight"], keep), ("norm_f.weight", ["model.norm.weight"], keep)],
        "layer": [("blocks.{i}.norm1.weight", ["model.layers.{i}.input_layernorm.weight"], keep),
                  *ATTN("attn", "model.layers.{i}.self_attn"),
                  ("blocks.{i}.norm2.weight", ["model.layers.{i}.post_attention_layernorm.weight"], keep),
                  ("blocks.{i}.ffn.gate_up.weight", [f"model.layers.{{i}}.mlp.{x}_proj.weight" for x in ("gate", "up")], cat),
                  ("blocks.{i}.ffn.out_proj.weight", ["model.layers.{i}.mlp.down_proj.weight"], keep)],
        "bias": [("blocks.{i}.attn.qkv.bias", [f"model.layers.{{i}}.self_attn.{x}_proj.bias" for x in "qkv"], cat),
                 ("blocks.{i}.attn.out_proj.bias", ["model.layers.{i}.self_attn.o_proj.bias"], keep),
                 ("blocks.{i}.ffn.gate_up.bias", [f"model.layers.{{i}}.mlp.{x}_proj.bias" for x in ("gate", "up")], cat),
                 ("blocks.{i}.ffn.out_proj.bias", ["model.layers.{i}.mlp.down_proj.bias"], keep)]},
    "mixtral": {
        "model": [("wte.weight", ["model.embed_tokens.weight"], keep), ("norm_f.weight", ["model.norm.weight"], keep)],
        "layer": [("blocks.{i}.norm1.weight", ["model.layers.{i}.input_layernorm.weight"], keep),
                  *ATTN("attn", "model.layers.{i}.self_attn"),
                  ("blocks.{i}.norm2.weight", ["model.layers.{i}.post_attention_layernorm.weight"], keep),
                  ("blocks.{i}.ffn.router.weight", ["model.layers.{i}.block_sparse_moe.gate.weight"], keep),
                  ("blocks.{i}.ffn.w_in", [f"model.layers.{{i}}.block_sparse_moe.experts.{{e}}.{w}.weight" for w in ("w1", "w3")],
                   experts_in),  # w1 is the gate, w3 the up projection
                  ("blocks.{i}.ffn.w_out", ["model.layers.{i}.block_sparse_moe.experts.{e}.w2.weight"], experts_out)]},
    "mamba": {
        "model": [("wte.weight", ["backbone.embeddings.weight"], keep), ("norm_f.weight", ["backbone.norm_f.weight"], keep)],
        "layer": [("blocks.{i}.norm.weight", ["backbone.layers.{i}.norm.weight"], keep),
                  *MAMBA("mixer", "backbone.layers.{i}.mixer")],
        "bias": MAMBA("mixer", "backbone.layers.{i}.mixer", ("in_proj.bias", "out_proj.bias"))[-2:]},
    "jamba": {  # a layer is "layer" + (A or M) + (d or e), as its word in model_hybrid's layers
        "model": [("wte.weight", ["model.embed_tokens.weight"], keep), ("norm_f.weight", ["model.final_layernorm.weight"], keep)],
        "layer": [("blocks.{i}.norm1.weight", ["model.layers.{i}.input_layernorm.weight"], keep),
                  ("blocks.{i}.norm2.weight", ["model.layers.{i}.pre_ff_layernorm.weight"], keep)],
        "A": ATTN("mixer", "model.layers.{i}.self_attn"),
        "M": MAMBA("mixer", "model.layers.{i}.mamba") + [(f"blocks.{{i}}.mixer.{a}_norm.weight",
                                                            [f"model.layers.{{i}}.mamba.{b}_layernorm.weight"], keep)
                                                           for a, b in (("dt", "dt"), ("B", "b"), ("C", "c"))],
        "d": [("blocks.{i}.ffn.gate_up.weight", [f"model.layers.{{i}}.feed_forward.{x}_proj.weight" for x in ("gate", "up")], cat),
              ("blocks.{i}.ffn.out_proj.weight", ["model.layers.{i}.feed_forward.down_proj.weight"], keep)],
        "e": [("blocks.{i}.ffn.router.weight", ["model.layers.{i}.feed_forward.router.weight"], keep),
              ("blocks.{i}.ffn.experts.{e}.gate_up.weight",
               [f"model.layers.{{i}}.feed_forward.experts.{{e}}.{x}_proj.weight" for x in ("gate", "up")], cat),
              ("blocks.{i}.ffn.experts.{e}.out_proj.weight", ["model.layers.{i}.feed_forward.experts.{e}.down_proj.weight"], keep)]},
}
ARCH = {"gpt2": "gpt2", "llama": "llama", "mistral": "llama", "mixtral": "mixtral", "mamba": "mamba", "jamba": "jamba"}
MODEL_FILE = {"gpt2": "transformer", "llama": "transformer", "mixtral": "moe", "mamba": "mamba", "jamba": "hybrid"}
# Config fields a caller may change on a loaded model: they change how it runs or trains, not what it computes
# (rope_scaling on purpose: a longer context than the checkpoint's)
FREE = {"block_size", "dropout", "flash", "scan", "expert_path", "rope_scaling", "rope_factor", "balance_coef", "z_coef",
        "bias_rate"}


# ----------------------------------------------------------------------------- config.json -> Config


def refuse(field, value, why):
    raise UsageError(f"config.json: {field}={json.dumps(value)}: {why}")


def rope_fields(hf):
    """RoPE's base and scaling, from rope_parameters (newer config.json) or rope_theta + rope_scaling."""
    rope = hf.get("rope_parameters") or {"rope_theta": hf.get("rope_theta", 10000.0), **(hf.get("rope_scaling") or {})}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", "linear"):
        refuse("rope_scaling", kind, "only linear (position interpolation) is read from a config.json; the model "
               "file's ntk and yarn take their trained length from block_size, not from a hub config")
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        refuse("partial_rotary_factor", rope["partial_rotary_factor"], "RoPE here rotates the whole head")
    out = {"rope_theta": float(rope["rope_theta"])}
    return {**out, "rope_scaling": "pi", "rope_factor": float(rope["factor"])} if kind == "linear" else out


def config_fields(hf):
    """config.json (a dict) -> this repository's Config fields. Refuses what the model file lacks."""
    arch = ARCH[hf["model_type"]]
    C, act = hf.get("hidden_size", hf.get("n_embd")), hf.get("hidden_act", hf.get("activation_function"))
    tie = hf.get("tie_word_embeddings", arch in ("gpt2", "mamba"))  # the defaults of their config classes
    if arch == "gpt2":
        if act not in ("gelu_new", "gelu", "relu"):
            refuse("activation_function", act, "the MLP here has gelu_new (tanh), gelu and relu")
        for field, want in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                            ("add_cross_attention", False)):
            if hf.get(field, want) != want:
                refuse(field, hf[field], f"attention here is {field}={json.dumps(want)}")
        return dict(vocab_size=hf["vocab_size"], block_size=hf["n_positions"], d_model=C, n_layer=hf["n_layer"],
                    n_head=hf["n_head"], n_kv_head=hf["n_head"], pos="learned", ffn={"gelu_new": "gelu_tanh"}.get(act, act),
                    norm="layernorm", d_ff=hf.get("n_inner") or 4 * C, bias=True, tie_embeddings=tie,
                    norm_eps=hf["layer_norm_epsilon"], init="gpt2")
    if arch == "mamba":
        if act != "silu":
            refuse("hidden_act", act, "Mamba here gates with SiLU")
        if hf["intermediate_size"] != hf["expand"] * C:
            refuse("intermediate_size", hf["intermediate_size"], f"Mamba here has expand * hidden_size = {hf['expand'] * C}")
        rank = hf["time_step_rank"]
        return dict(vocab_size=hf["vocab_size"], block_size=2048, d_model=C, n_layer=hf["num_hidden_layers"],
                    d_state=hf["state_size"], d_conv=hf["conv_kernel"], expand=hf["expand"],
                    dt_rank=math.ceil(C / 16) if rank == "auto" else rank, conv_bias=hf["use_conv_bias"],
                    bias=hf["use_bias"], tie_embeddings=tie, norm_eps=hf["layer_norm_epsilon"])
    if act != "silu":
        refuse("hidden_act", act, "the feed-forward here is SwiGLU (SiLU)")
    H, K = hf["num_attention_heads"], hf.get("num_key_value_heads") or hf["num_attention_heads"]
    if hf.get("head_dim") not in (None, C // H):
        refuse("head_dim", hf["head_dim"], f"heads here are hidden_size / num_attention_heads = {C // H} wide")
    length = hf.get("max_position_embeddings", 4096)
    if hf.get("sliding_window") is not None and hf["sliding_window"] < length:
        refuse("sliding_window", hf["sliding_window"], "attention here sees the whole context")
    common = dict(vocab_size=hf["vocab_size"], block_size=length, d_model=C, n_layer=hf["num_hidden_layers"],
                  n_head=H, n_kv_head=K, tie_embeddings=tie, norm_eps=hf["rms_norm_eps"])
    if arch == "jamba":
        for field, want in (("mamba_conv_bias", True), ("mamba_proj_bias", False)):
            if hf.get(field, want) != want:
                refuse(field, hf[field], f"the hybrid's Mamba layers have {field}={json.dumps(want)}")
        E, period = hf["num_experts"], (hf["attn_layer_period"], hf["attn_layer_offset"])
        words = [("A" if i % period[0] == period[1] else "M") +
                 ("e" if E > 1 and i % hf["expert_layer_period"] == hf["expert_layer_offset"] else "d")
                 for i in range(hf["num_hidden_layers"])]
        rank = hf["mamba_dt_rank"]
        common.pop("n_layer")
        return dict(common, layers=" ".join(words), d_state=hf["mamba_d_state"], d_conv=hf["mamba_d_conv"],
                    expand=hf["mamba_expand"], dt_rank=math.ceil(C / 16) if rank == "auto" else rank, inner_norm=True,
                    d_ff=hf["intermediate_size"], n_expert=E, top_k=min(hf["num_experts_per_tok"], E),
                    d_expert=hf["intermediate_size"], norm_topk=False, bias=False)
    common.update(pos="rope", ffn="swiglu", norm="rmsnorm", d_ff=hf["intermediate_size"], **rope_fields(hf))
    if arch == "llama":
        biases = hf.get("attention_bias", False), hf.get("mlp_bias", False)
        if biases[0] != biases[1]:
            refuse("attention_bias", biases[0], f"biases here are in attention and feed-forward or neither (mlp_bias={biases[1]})")
        return dict(common, bias=biases[0])
    E, F_ = hf["num_local_experts"], hf["intermediate_size"]
    return dict(common, n_expert=E, top_k=hf["num_experts_per_tok"], d_expert=F_, router="softmax", norm_topk=True,
                balance_coef=hf.get("router_aux_loss_coef", 0.0) if hf.get("output_router_logits") else 0.0, z_coef=0.0,
                expert_path="grouped" if F_ % 8 == 0 and C % 8 == 0 else "loop")


# ----------------------------------------------------------------------------- weights


def read_tensors(folder):
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise UsageError("reading a Hugging Face checkpoint needs the safetensors package (pip install safetensors)") from None
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise UsageError(f"{folder} has no *.safetensors files (other weight formats are not read)")
    tensors = {}
    for f in files:
        try:
            tensors.update(load_file(f))
        except Exception as e:
            raise UsageError(f"{f} is not a readable safetensors file: {one_line(e)}") from None
    return tensors


def layer_parts(arch, cfg, i):
    """The parts of TABLES[arch] that layer i has."""
    if arch == "jamba":
        return ["layer", *cfg.layers.split()[i]]  # "Me" -> layer, M, e
    return ["layer", "bias"] if getattr(cfg, "bias", False) and arch in ("llama", "mamba") else ["layer"]


def fill(model, arch, tensors):
    """Our state dict, made of the checkpoint's tensors by the table. Every parameter filled once,
    every tensor used once (GPT-2's causal-mask buffers aside)."""
    cfg, table, used, out = model.config, TABLES[arch], set(), {}

    def take(name):
        if name not in tensors:
            raise UsageError(f"checkpoint has no tensor {name}, which a {arch} model with this config.json has")
        used.add(name)
        return tensors[name].float()

    rows = [(r, None) for r in table["model"]]
    rows += [(r, i) for i in range(cfg.n_layer) for part in layer_parts(arch, cfg, i) for r in table[part]]
    for (ours, theirs, how), i in rows:
        n_expert = getattr(cfg, "n_expert", 1)
        if "{e}" in ours:  # one of our tensors per expert
            for e in range(n_expert):
                out[ours.format(i=i, e=e)] = how([take(t.format(i=i, e=e)) for t in theirs])
        elif "{e}" in theirs[0]:  # the experts stacked into one tensor
            out[ours.format(i=i)] = how([[take(t.format(i=i, e=e)) for t in theirs] for e in range(n_expert)])
        else:
            out[ours.format(i=i)] = how([take(t.format(i=i)) for t in theirs])
    if cfg.tie_embeddings:
        head = tensors.get("lm_head.weight")
        if head is not None and not torch.equal(head, tensors[table["model"][0][1][0]]):
            raise UsageError("config.json: tie_word_embeddings=true, but lm_head.weight differs from the embedding")
        used.add("lm_head.weight")
        out["lm_head.weight"] = out["wte.weight"]
    else:
        out["lm_head.weight"] = take("lm_head.weight")
    unused = sorted(set(tensors) - used - {k for k in tensors if k.endswith((".attn.bias", ".attn.masked_bias"))})
    if unused:
        raise UsageError(f"checkpoint tensor {unused[0]} has no place in model_{MODEL_FILE[arch]}.py "
                         f"({len(unused)} unused); a config field the loader does not know?")
    want = model.state_dict()
    for name, t in out.items():
        if t.shape != want[name].shape:
            raise UsageError(f"{name} needs shape {tuple(want[name].shape)}, the checkpoint gives {tuple(t.shape)}")
    missing = sorted(want.keys() - out.keys())
    if missing:
        raise UsageError(f"nothing in the checkpoint fills {missing[0]} ({len(missing)} parameters)")
    return out


# ----------------------------------------------------------------------------- directories and the hub


def find(source):
    """A local directory, or a hub name fetched (config, weights, tokenizer) into the hub's cache."""
    path = Path(source)
    if path.is_dir():
        return path
    if path.exists():
        raise UsageError(f"{source} is a file; give a Hugging Face model directory or hub name")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise UsageError(f"no directory {source} (a hub name needs huggingface_hub: pip install huggingface_hub)") from None
    try:
        return Path(snapshot_download(source, allow_patterns=["config.json", "*.safetensors", "tokenizer.json"]))
    except Exception as e:
        raise UsageError(f"no directory {source}, and the hub did not give it: {type(e).__name__}") from None


def read_config(source):
    """-> (the folder, config.json as a dict)."""
    folder = find(source)
    if not (folder / "config.json").is_file():
        raise UsageError(f"{folder} has no config.json: not a Hugging Face model directory")
    try:
        hf = json.loads((folder / "config.json").read_text())
        kind = hf["model_type"]
    except Exception as e:
        raise UsageError(f"{folder / 'config.json'} is not a model config: {one_line(e)}") from None
    if kind not in ARCH:
        raise UsageError(f"config.json: model_type={json.dumps(kind)}: this loader reads {', '.join(ARCH)}")
    return folder, hf


def model_name(source):
    """Which model file a Hugging Face model goes into: a name of data.MODELS."""
    return MODEL_FILE[ARCH[read_config(source)[1]["model_type"]]]


def load_model(source, overrides=None):
    """-> (model name in data.MODELS, model in float32). overrides: Config fields of FREE."""
    folder, hf = read_config(source)
    kind = hf["model_type"]
    arch, bad = ARCH[kind], sorted(set(overrides or {}) - FREE)
    if bad:
        raise UsageError(f"--{bad[0]} would change what the pretrained model computes (free to set: {', '.join(sorted(FREE))})")
    try:
        fields = config_fields(hf)
        module = MODELS[MODEL_FILE[arch]]
        fields.update({k: v for k, v in (overrides or {}).items() if hasattr(module.Config, k)})
        cfg = module.Config(**fields)
    except KeyError as e:
        raise UsageError(f"config.json has no {e.args[0]}, which a {kind} config has") from None
    except ValueError as e:
        raise UsageError(f"config.json does not fit model_{MODEL_FILE[arch]}.py: {one_line(e)}") from None
    model = module.Model(cfg)
    if arch == "gpt2":  # "transformer.h.0..." and "h.0..." are both seen in the wild
        tensors = {k.removeprefix("transformer."): v for k, v in read_tensors(folder).items()}
    else:
        tensors = read_tensors(folder)
    state = fill(model, arch, tensors)
    model.load_state_dict(state)
    return MODEL_FILE[arch], model


def tokenizer_spec(source, data_dir="data"):
    """GPT-2's byte-pair encoding through tiktoken (data_dir/gpt2.tiktoken, or tiktoken's download);
    every other model's own tokenizer.json, read by the tokenizers package."""
    folder, hf = read_config(source)
    if hf["model_type"] == "gpt2":
        return bpe_spec("gpt2", data_dir)
    if not (folder / "tokenizer.json").is_file():
        raise UsageError(f"{folder} has no tokenizer.json")
    return {"kind": "hf", "json": (folder / "tokenizer.json").read_text()}
