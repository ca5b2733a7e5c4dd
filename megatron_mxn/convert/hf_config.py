"""The Megatron-LM model flags a Hugging Face `config.json` implies, or a refusal.

Works on the plain config dict (no transformers import), so that the entry points can map a
`--hf-dir` without the `hf` extra. Every HF field that changes what the model computes is either
mapped to a flag whose megatron-core 0.19.2 semantics equal transformers' (checked numerically by
tests/test_hf_convert.py) or refused with a `ConversionError` naming the field: a conversion is
exact or it does not happen.
"""

from __future__ import annotations

from typing import Dict, List, Union

FAMILIES = ("llama", "mistral", "mixtral", "qwen2", "qwen3")

# Megatron's Llama-3.1 RoPE scaling has these fixed (RotaryEmbedding._apply_scaling), and
# megatron.training's gpt_config_from_args does not pass --rope-scaling-factor on to the model
# (0.19.2: GPTModelConfig keeps its default 8.0), so only this exact set converts.
LLAMA3_ROPE = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}

# Biases megatron cannot give alone: it biases every linear layer (--add-bias-linear) or QKV only.
BIASES = {"attention_bias": "biases q/k/v and o_proj; megatron's --add-qkv-bias biases QKV "
                            "only, --add-bias-linear the MLP too",
          "mlp_bias": "megatron's --add-bias-linear would bias attention too"}

DTYPE_FLAGS = {"float32": None, "bfloat16": "--bf16", "float16": "--fp16"}

Flag = Union[bool, int, float, str]


class ConversionError(ValueError):
    """An HF config (or checkpoint) the converter cannot map exactly; names the field."""


def _refuse(field: str, value, why: str) -> ConversionError:
    return ConversionError(f"HF config field {field}={value!r}: {why}")


def rope_settings(cfg: dict) -> dict:
    """{rope_type, rope_theta, ...} from transformers 5's `rope_parameters` or the older
    top-level `rope_theta` / `rope_scaling` fields."""
    params = cfg.get("rope_parameters")
    if params:
        return dict(params)
    out = dict(cfg.get("rope_scaling") or {})
    out.setdefault("rope_type", out.pop("type", "default"))
    out["rope_theta"] = cfg.get("rope_theta", 10000.0)
    return out


def head_dim(cfg: dict) -> int:
    return cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]


def weights_dtype(cfg: dict) -> str:
    """The dtype config.json declares for the weights (`dtype`, formerly `torch_dtype`)."""
    return str(cfg.get("dtype") or cfg.get("torch_dtype") or "float32").replace("torch.", "")


def _check_family(cfg: dict) -> str:
    family = cfg.get("model_type")
    if family not in FAMILIES:
        raise _refuse("model_type", family, f"not a converted family (converted: "
                      f"{', '.join(FAMILIES)})")
    if cfg.get("hidden_act", "silu") != "silu":
        raise _refuse("hidden_act", cfg["hidden_act"], "megatron's --swiglu is SiLU-gated")
    for field, why in BIASES.items():
        if cfg.get(field):
            raise _refuse(field, True, why)
    if cfg.get("partial_rotary_factor", 1.0) != 1.0:
        raise _refuse("partial_rotary_factor", cfg["partial_rotary_factor"],
                      "not mapped (megatron's --rotary-percent rotates the leading dims; "
                      "unverified against transformers)")
    return family


def _rope_flags(cfg: dict) -> Dict[str, Flag]:
    rope = rope_settings(cfg)
    theta = rope.get("rope_theta", 10000.0)
    if float(theta) != int(theta):
        raise _refuse("rope_theta", theta, "megatron's --rotary-base is an integer")
    flags: Dict[str, Flag] = {"--position-embedding-type": "rope", "--rotary-base": int(theta)}
    kind = rope.get("rope_type", "default")
    if kind == "llama3":
        for key, want in LLAMA3_ROPE.items():
            if float(rope.get(key, -1)) != want:
                raise _refuse(f"rope_scaling.{key}", rope.get(key),
                              f"megatron-core 0.19.2 computes Llama-3.1 RoPE scaling with "
                              f"{key}={want} only ({LLAMA3_ROPE})")
        flags.update({"--use-rope-scaling": True, "--rope-scaling-factor": LLAMA3_ROPE["factor"]})
    elif kind != "default":
        raise _refuse("rope_scaling.rope_type", kind, "only 'default' and 'llama3' RoPE map "
                      "exactly to megatron-core 0.19.2's RoPE")
    return flags


def _window_flags(cfg: dict, family: str) -> Dict[str, Flag]:
    """Mistral / Mixtral: every layer attends to the last `sliding_window` keys, the query
    included (transformers: kv_idx > q_idx - W), which is megatron's window_size (W - 1, 0).
    Qwen2/3 window some layers only, by `max_window_layers`: refused."""
    window = cfg.get("sliding_window")
    if family in ("qwen2", "qwen3"):
        if cfg.get("use_sliding_window"):
            raise _refuse("use_sliding_window", True, "Qwen's per-layer sliding windows "
                          "(max_window_layers) are not mapped")
        window = None
    kinds = set(cfg.get("layer_types") or ())
    if kinds - {"full_attention"} and family not in ("mistral", "mixtral"):
        raise _refuse("layer_types", sorted(kinds), "only full-attention layers are mapped")
    if window is None:
        return {}
    if int(window) < 1:
        raise _refuse("sliding_window", window, "must be at least 1")
    return {"--window-size": f"{int(window) - 1},0"}


def _moe_flags(cfg: dict) -> Dict[str, Flag]:
    """Mixtral's router: softmax over all experts in fp32, top-k, renormalised to sum 1 ==
    megatron's default softmax router (top-k of the logits, softmax over the k chosen), with
    the router in fp32."""
    if cfg.get("router_jitter_noise"):
        raise _refuse("router_jitter_noise", cfg["router_jitter_noise"], "transformers "
                      "scales the experts' input too; megatron's --moe-input-jitter-eps only "
                      "the router's")
    flags: Dict[str, Flag] = {
        "--num-experts": cfg["num_local_experts"],
        "--moe-router-topk": cfg["num_experts_per_tok"],
        "--moe-ffn-hidden-size": cfg["intermediate_size"],
        "--moe-router-score-function": "softmax",
        "--moe-router-dtype": "fp32",
    }
    if cfg.get("output_router_logits"):  # transformers adds its auxiliary loss only then
        flags["--moe-aux-loss-coeff"] = cfg.get("router_aux_loss_coef", 0.0)
    return flags


def megatron_flag_values(cfg: dict) -> Dict[str, Flag]:
    """Megatron-LM flag -> value (True: a switch) for the HF config dict `cfg`."""
    family = _check_family(cfg)
    heads, groups = cfg["num_attention_heads"], cfg.get("num_key_value_heads") or \
        cfg["num_attention_heads"]
    flags: Dict[str, Flag] = {
        "--num-layers": cfg["num_hidden_layers"],
        "--hidden-size": cfg["hidden_size"],
        "--ffn-hidden-size": cfg["intermediate_size"],
        "--num-attention-heads": heads,
        "--group-query-attention": True,
        "--num-query-groups": groups,
        "--kv-channels": head_dim(cfg),
        "--max-position-embeddings": cfg["max_position_embeddings"],
        "--padded-vocab-size": cfg["vocab_size"],
        "--normalization": "RMSNorm",
        "--norm-epsilon": cfg.get("rms_norm_eps", 1e-6),
        "--swiglu": True,
        "--disable-bias-linear": True,
        "--attention-dropout": cfg.get("attention_dropout", 0.0),
        "--hidden-dropout": 0.0,
        "--attention-softmax-in-fp32": True,
    }
    flags.update(_rope_flags(cfg))
    if family == "qwen2":
        flags["--add-qkv-bias"] = True  # Qwen2 always biases q/k/v, never o_proj
    if family == "qwen3":
        flags["--qk-layernorm"] = True
    if not cfg.get("tie_word_embeddings", False):  # every family's config class default
        flags["--untie-embeddings-and-output-weights"] = True
    flags.update(_window_flags(cfg, family))
    if family == "mixtral":
        flags.update(_moe_flags(cfg))
    dtype = weights_dtype(cfg)
    if dtype not in DTYPE_FLAGS:
        raise _refuse("dtype", dtype, f"converted dtypes: {', '.join(DTYPE_FLAGS)}")
    if DTYPE_FLAGS[dtype]:
        flags[DTYPE_FLAGS[dtype]] = True
    return flags


def flags_list(values: Dict[str, Flag]) -> List[str]:
    out: List[str] = []
    for flag, value in values.items():
        if value is True:
            out.append(flag)
        elif value is not False and value is not None:
            out += [flag, str(value)]
    return out


def megatron_flags(cfg: dict) -> List[str]:
    """The Megatron-LM model flags (argv form) for the HF config dict `cfg`."""
    return flags_list(megatron_flag_values(cfg))
