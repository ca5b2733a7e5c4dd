"""A Hugging Face directory as the model of a Megatron run (`--hf-dir DIR` on the generation and
pretraining entry points): the model flags its config.json implies and Megatron's
HuggingFaceTokenizer on its tokenizer files, placed first on the command line so that explicit
flags win; and the checks that the run's `--load` holds that model.

No transformers import here: the flags come from the plain config dict (hf_config).
"""

from __future__ import annotations

import os
from typing import List

from megatron_mxn.convert.hf_config import ConversionError, megatron_flags

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

CONVERT_HINT = "python -m megatron_mxn.convert hf-to-megatron --hf-dir {dir} --save CKPT"


def tokenizer_flags(hf_dir: str) -> List[str]:
    """Megatron's HuggingFaceTokenizer on the HF directory, when it holds a tokenizer."""
    if any(os.path.exists(os.path.join(hf_dir, f)) for f in TOKENIZER_FILES):
        return ["--tokenizer-type", "HuggingFaceTokenizer",
                "--tokenizer-model", os.path.abspath(hf_dir)]
    return []


def hf_dir_flags(hf_dir: str, generation: bool) -> List[str]:
    """The Megatron flags of the model in `hf_dir` and of its tokenizer. Generation also gets
    `--seq-length` = the model's context (Megatron requires the flag; generation sizes its KV
    cache from the prompts and new tokens instead); a training run must choose its own."""
    from megatron_mxn.convert.hf_files import read_config

    cfg = read_config(hf_dir)
    flags = megatron_flags(cfg) + tokenizer_flags(hf_dir)
    if generation:
        flags += ["--seq-length", str(cfg["max_position_embeddings"])]
    return flags


def check_hf_run(args, training: bool) -> None:
    """Before any collective, on every rank: a run with --hf-dir loads a checkpoint of that
    model (converted from it, or saved by a run started from one), and a training run names
    its sequence length."""
    from megatron_mxn.convert.checkpoint import saved_args

    hint = CONVERT_HINT.format(dir=args.hf_dir)
    if args.load is None:
        raise ConversionError(f"--hf-dir {args.hf_dir} needs --load with the model's weights: "
                              f"convert them first ({hint}), then --load CKPT")
    if not os.path.exists(os.path.join(args.load, "latest_checkpointed_iteration.txt")):
        raise ConversionError(f"--load {args.load} holds no Megatron checkpoint; convert the HF "
                              f"weights first: {hint}")
    if training and "--seq-length" not in _given_flags():
        raise ConversionError("--hf-dir does not choose a training sequence length: pass "
                              f"--seq-length (the model's context is "
                              f"{args.max_position_embeddings} tokens)")
    check_same_model(args, saved_args(args.load), args.load)


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


def _given_flags() -> set:
    import sys

    return {a.split("=")[0] for a in sys.argv[1:] if a.startswith("--")}
