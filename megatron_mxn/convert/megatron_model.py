"""The TP=1 megatron-core GPTModel of a set of Megatron-LM flags, built the way
megatron.training builds it (its parser, validate_args, gpt_config_from_args, GPTModelBuilder),
so that the converted weights are checked against the model those flags really give.

Runs in a process that already has a torch.distributed world and CPU mode with megatron.training's
patches (`megatron_mxn.cpu.enable(training=True)`); sets no Megatron global state.
"""

from __future__ import annotations

import contextlib
import copy
import io
import sys
from typing import List, Optional

# Flags the conversion run needs besides the model's; none of them changes the weights.
RUN_FLAGS = ("--micro-batch-size", "1", "--distributed-backend", "gloo",
             "--ckpt-format", "torch_dist", "--no-save-optim", "--no-save-rng")


@contextlib.contextmanager
def _argv(argv: List[str]):
    old = sys.argv
    sys.argv = ["megatron_mxn.convert", *argv]
    try:
        yield
    finally:
        sys.argv = old


def megatron_args(flags: List[str], extra_args_provider=None):
    """megatron.training's parsed and validated args Namespace for `flags` (argv form), without
    setting Megatron's global args. `extra_args_provider` adds argparse options (the grid's)."""
    from megatron.training.arguments import parse_args, validate_args

    with _argv(list(flags)):
        args = parse_args(extra_args_provider)
    with contextlib.redirect_stdout(io.StringIO()):  # validate_args prints every argument
        validate_args(args, {})
    return args


def run_flags(model_flags: List[str], seq_length: int, extra: Optional[List[str]] = None
              ) -> List[str]:
    return [*model_flags, *RUN_FLAGS, "--seq-length", str(seq_length), *(extra or [])]


def build_model(args, builder_config=None):
    """This rank's GPTModel (unwrapped) for megatron args `args`; its weights are left
    uninitialised (they are about to be overwritten). `builder_config(args)` gives the
    GPTModelConfig (default: megatron.training's gpt_config_from_args)."""
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.utils import unwrap_model
    from megatron.training.argument_utils import gpt_config_from_args
    from megatron.training.models.gpt import GPTModelBuilder

    build_args = copy.copy(args)
    build_args.perform_initialization = False  # copied into TransformerConfig by name
    cfg = (builder_config or gpt_config_from_args)(build_args)
    chunks = GPTModelBuilder(cfg).build_distributed_models(
        pg_collection=ProcessGroupCollection.use_mpu_process_groups(), wrap_with_ddp=False)
    if len(chunks) != 1:
        raise ValueError("the converter builds one model chunk (no virtual pipeline)")
    return unwrap_model(chunks[0])


@contextlib.contextmanager
def global_args(args):
    """Megatron's global args set to `args` for the duration (save/load_checkpoint read them)."""
    from megatron.training import global_vars

    old = global_vars._GLOBAL_ARGS
    global_vars.set_args(args)
    try:
        yield
    finally:
        global_vars.set_args(old)
