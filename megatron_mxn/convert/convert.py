"""The two conversions, HF directory -> Megatron checkpoint and back, in a process whose
torch.distributed world is one rank with megatron-core's parallel state at TP=1 (the CLI in
__main__ sets that up; a test worker of one rank has it).
"""

from __future__ import annotations

import os
from typing import List

import torch

from megatron_mxn.convert import checkpoint, hf_files, weights
from megatron_mxn.convert.hf_config import ConversionError, megatron_flags
from megatron_mxn.convert.megatron_model import build_model, megatron_args, run_flags

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")

# Model fields a checkpoint's args must share with the HF config's flags to be that model.
MODEL_FIELDS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                "num_query_groups", "kv_channels", "padded_vocab_size", "normalization",
                "norm_epsilon", "swiglu", "add_bias_linear", "add_qkv_bias", "qk_layernorm",
                "untie_embeddings_and_output_weights", "position_embedding_type",
                "rotary_base", "rotary_percent", "rotary_interleaved", "use_rope_scaling",
                "window_size", "window_attn_skip_freq", "num_experts", "moe_router_topk",
                "moe_ffn_hidden_size", "moe_router_score_function", "moe_router_pre_softmax",
                "moe_shared_expert_intermediate_size", "multi_latent_attention")


def tokenizer_flags(hf_dir: str) -> List[str]:
    """Megatron's HuggingFaceTokenizer on the HF directory, when it holds a tokenizer."""
    if any(os.path.exists(os.path.join(hf_dir, f)) for f in TOKENIZER_FILES):
        return ["--tokenizer-type", "HuggingFaceTokenizer",
                "--tokenizer-model", os.path.abspath(hf_dir)]
    return []


def hf_args(cfg: dict, extra: List[str], extra_args_provider=None):
    """Megatron's validated args for the HF config's model plus the flags `extra`."""
    return megatron_args(run_flags(megatron_flags(cfg), cfg["max_position_embeddings"], extra),
                         extra_args_provider)


def load_weights(model, state: dict) -> None:
    """Copy `state` into `model` exactly: every parameter, same shapes and dtypes."""
    own = {k: v for k, v in model.state_dict().items() if not k.endswith("._extra_state")}
    if set(own) != set(state):
        raise ConversionError(f"converted tensors and the Megatron model differ: missing "
                              f"{sorted(set(own) - set(state))[:8]}, extra "
                              f"{sorted(set(state) - set(own))[:8]}")
    for name, tensor in state.items():
        if own[name].shape != tensor.shape or own[name].dtype != tensor.dtype:
            raise ConversionError(
                f"{name}: the HF weight is {tuple(tensor.shape)} {tensor.dtype}, the model "
                f"built from config.json wants {tuple(own[name].shape)} {own[name].dtype} "
                "(config.json's dtype must be the weights' dtype)")
    with torch.no_grad():
        for name, tensor in state.items():
            own[name].copy_(tensor)


def hf_to_megatron(hf_dir: str, save: str) -> List[str]:
    """Write HF directory `hf_dir` as a Megatron torch_dist 'release' checkpoint in `save`;
    returns the Megatron model flags of the model."""
    from megatron_mxn.convert.checkpoint import save_release

    cfg = hf_files.read_config(hf_dir)
    args = hf_args(cfg, ["--save", os.path.abspath(save), "--save-interval", "1",
                        *tokenizer_flags(hf_dir)])
    state = weights.hf_to_megatron(hf_files.read_weights(hf_dir), cfg)
    model = build_model(args)
    load_weights(model, state)
    save_release(model, args)
    return megatron_flags(cfg)


def check_same_model(mine, saved, where: str) -> None:
    """Refuse a checkpoint whose args describe another model than the HF config's flags."""
    from megatron_mxn.attention.schedules import standard_attention

    def value(args, name):
        if name == "num_query_groups" and not getattr(args, "group_query_attention", False):
            return args.num_attention_heads
        return getattr(args, name, None)

    wrong = [f"{n}: checkpoint {value(saved, n)!r}, HF config {value(mine, n)!r}"
             for n in MODEL_FIELDS if value(saved, n) != value(mine, n)]
    if (getattr(saved, "mxn_dim_slices", 1) or 1) > 1 and not standard_attention(
            getattr(saved, "mxn_attention", "auto")):
        wrong.append(f"mxn_attention: checkpoint {saved.mxn_attention!r} (the seed paper's "
                     "per-slice attention, a different model), HF standard attention")
    if wrong:
        raise ConversionError(f"checkpoint {where} is not the model of the HF config: "
                              + "; ".join(wrong))


def megatron_to_hf(load: str, hf_dir: str, save_hf: str) -> List[str]:
    """Write Megatron checkpoint `load` as an HF directory `save_hf`, with `hf_dir`'s config,
    tokenizer and file layout; returns the Megatron model flags of the model."""
    cfg = hf_files.read_config(hf_dir)
    args = hf_args(cfg, [])
    check_same_model(args, checkpoint.saved_args(load), load)
    state = weights.megatron_to_hf(checkpoint.load_tp1_state(load, args), cfg)
    hf_files.copy_side_files(hf_dir, save_hf)
    hf_files.write_weights(state, save_hf, hf_dir)
    return megatron_flags(cfg)
