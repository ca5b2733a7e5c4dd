"""The generation entry point's flags (megatron_mxn.inference.generate): its own options
beside Megatron's (`GENERATE`, defined with the other flag groups in megatron_lm/flags.py),
the split of a command line between the two after --config/--layout expansion, and the checks
of a request that fail before any collective."""

from __future__ import annotations

import sys
from typing import List

from megatron_mxn.grid.layout import MxnConfigError
from megatron_mxn.megatron_lm import add_mxn_args, check_checkpoint_args
from megatron_mxn.megatron_lm.flags import GENERATE
from megatron_mxn.megatron_lm.run_configs import (
    expand_config_args,
    generation_option_strings,
    megatron_option_strings,
)

__all__ = ["GENERATE", "check_request", "check_sampling", "split_argv"]


def split_argv(argv: List[str]):
    """(generation options, remaining Megatron argv), after expanding --config/--layout."""
    known = megatron_option_strings(add_mxn_args) | generation_option_strings()
    argv = expand_config_args(argv, known, section="inference")
    return GENERATE.parse_known_args(argv)


def check_request(gen, args) -> None:
    """Bad requests fail here, identically on every rank, before any collective."""
    for name in ("batch_size", "max_new_tokens", "prompt_length", "repeats"):
        if getattr(gen, name) < 1:
            raise MxnConfigError(f"--{name.replace('_', '-')} must be >= 1")
    explicit = set(sys.argv)
    if "--inference-max-requests" in explicit and gen.batch_size > args.inference_max_requests:
        raise MxnConfigError(
            f"--batch-size ({gen.batch_size}) is larger than the KV cache "
            f"(--inference-max-requests {args.inference_max_requests})")
    total = gen.prompt_length + gen.max_new_tokens
    if "--inference-max-seq-length" in explicit and total > args.inference_max_seq_length:
        raise MxnConfigError(
            f"prompt + new tokens ({gen.prompt_length} + {gen.max_new_tokens}) exceed the KV "
            f"cache (--inference-max-seq-length {args.inference_max_seq_length})")
    if total > args.max_position_embeddings:
        raise MxnConfigError(f"prompt + new tokens ({total}) exceed --max-position-embeddings "
                             f"({args.max_position_embeddings})")
    micro = gen.inference_micro_batches or args.pipeline_model_parallel_size
    if gen.batch_size % micro:
        raise MxnConfigError(f"--batch-size ({gen.batch_size}) must be divisible by the "
                             f"inference micro-batches ({micro})")
    if args.hf_dir:  # --load holds the HF directory's model (or says how to convert it)
        from megatron_mxn.convert.hf_run import check_hf_run

        check_hf_run(args, training=False)
    if args.load is None:
        raise MxnConfigError("--load CHECKPOINT is required: generation compares layouts on "
                             "the same weights")
    check_sampling(gen)
    check_checkpoint_args(args)
    if args.hybrid_layer_pattern is not None:  # Mamba layers on CPU are refused here
        from megatron_mxn.attention.hybrid_spec import check_hybrid_pattern  # (megatron)

        check_hybrid_pattern(args.hybrid_layer_pattern)


def check_sampling(gen) -> None:
    """The sampling flags, with Megatron's rule that top-k and top-p exclude each other."""
    if gen.temperature < 0 or gen.top_k < 0 or not 0.0 <= gen.top_p <= 1.0:
        raise MxnConfigError("sampling needs --temperature >= 0, --top_k >= 0 and --top_p in "
                             "[0, 1]")
    if gen.top_k > 0 and gen.top_p > 0.0:
        raise MxnConfigError(f"--top_k ({gen.top_k}) and --top_p ({gen.top_p}) cannot both be "
                             "set (Megatron's rule): pass --top_k 0 with --top_p")
