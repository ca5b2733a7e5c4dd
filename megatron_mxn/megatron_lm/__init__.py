"""The grid in Megatron-LM's training package (`megatron.training`, shipped in the megatron-core
wheel): flags, config and layer spec from args, checkpoint checks, training-log additions, and
the pretraining entry point (`pretrain_gpt`).

A Megatron-LM script (see patches/) needs only the names below:

    args = parse_and_validate_args(extra_args_provider=with_mxn_args(other_provider))
    check_checkpoint_args(args)                      # before any collective
    model_cfg = mxn_gpt_config_from_args(args)       # instead of gpt_config_from_args(args)
"""

from megatron_mxn.megatron_lm.checkpoint_args import check_checkpoint_args
from megatron_mxn.megatron_lm.flags import add_mxn_args, resolve_mxn_args, with_mxn_args
from megatron_mxn.megatron_lm.model_config import (
    mxn_gpt_config_from_args,
    mxn_transformer_config_from_args,
)

__all__ = ["add_mxn_args", "check_checkpoint_args", "mxn_gpt_config_from_args",
           "mxn_transformer_config_from_args", "resolve_mxn_args", "with_mxn_args"]
