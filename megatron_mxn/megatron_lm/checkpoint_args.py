"""Checks of a `--load` checkpoint against this run, on every rank before any collective: the
files are complete, the model shape and the attention model (standard vs sliced) match, and
optimizer state in a per-rank format is not loaded under another grid."""

from __future__ import annotations

import os

from megatron_mxn.attention.schedules import AUTO, standard_attention
from megatron_mxn.grid.layout import MxnConfigError
from megatron_mxn.megatron_lm.checkpoint_files import check_checkpoint_files


SHAPE_ARGS = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups",
              "kv_channels", "ffn_hidden_size", "num_experts", "padded_vocab_size")


def attention_model(args) -> str:
    """'standard' for every schedule computing standard attention (Schedule.exact), else the
    schedule's model: 'sliced over m dim slices' for the seed paper's per-slice one."""
    name = getattr(args, "mxn_attention", AUTO)
    if (getattr(args, "mxn_dim_slices", 1) or 1) > 1 and not standard_attention(name):
        return f"{name} over {args.mxn_dim_slices} dim slices"
    return "standard"


def check_checkpoint_args(args) -> None:
    """Compare this run with the args saved in the `--load` checkpoint (its common state)
    before anything is loaded: model shape flags, and standard vs sliced
    attention, which are different models with the same tensor shapes."""
    if not getattr(args, "load", None):
        return
    tracker = os.path.join(args.load, "latest_checkpointed_iteration.txt")
    if not os.path.exists(tracker):
        if getattr(args, "exit_on_missing_checkpoint", False):
            raise MxnConfigError(f"no Megatron checkpoint in {args.load} "
                                 f"(no {os.path.basename(tracker)})")
        return
    tag = str(getattr(args, "ckpt_step", None) or open(tracker).read().strip())
    step_dir = os.path.join(args.load, tag if tag == "release" else f"iter_{int(tag):07d}")
    check_checkpoint_files(step_dir)  # all files there: one rank failing to read stalls the rest
    if not os.path.exists(os.path.join(step_dir, "metadata.json")):
        return  # not a dist_checkpointing (torch_dist) checkpoint; Megatron's loader checks it
    from megatron.core.dist_checkpointing import load_common_state_dict, load_content_metadata

    common = load_common_state_dict(step_dir)  # local read, no collective
    saved = common.get("args")
    if saved is None:
        return
    for name in SHAPE_ARGS:
        mine, theirs = getattr(args, name, None), getattr(saved, name, None)
        if name == "num_query_groups" and not getattr(saved, "group_query_attention", True):
            theirs = saved.num_attention_heads
        if name == "num_query_groups" and not getattr(args, "group_query_attention", True):
            mine = args.num_attention_heads
        if theirs is not None and mine is not None and mine != theirs:
            raise MxnConfigError(
                f"checkpoint {args.load} was saved with {name}={theirs}, this run asks for "
                f"{name}={mine}: the model flags must match the checkpoint's")
    if not hasattr(saved, "mxn_attention"):
        saved_model = "standard"  # saved without megatron_mxn: megatron-core's attention
    else:
        saved_model = attention_model(saved)
    if saved_model != attention_model(args):
        raise MxnConfigError(
            f"checkpoint {args.load} holds a model with {saved_model} attention, this run "
            f"asks for {attention_model(args)} attention (--mxn-attention "
            f"{args.mxn_attention}): the seed paper's sliced attention is a different model "
            "(h*m heads of d/m dims), so its weights do not load into standard attention or "
            "back")
    check_optimizer_layout(args, saved, load_content_metadata(preloaded_state_dict=common))


# Distributed-optimizer checkpoint formats stored by model tensor (key, global shape), which the
# grid's sharded_state_dict re-expresses: they reshard across grids (tested: fully_reshardable).
# The others (dp_reshardable, megatron's default) hold each rank's flat optimizer buffer.
GRID_RESHARDABLE_OPTIM_FORMATS = ("fully_reshardable",)


def saved_grid(saved) -> tuple:
    """(n, m) of a checkpoint's args; saved without megatron_mxn, TP=t is the grid t x 1."""
    n = getattr(saved, "mxn_head_groups", None) or saved.tensor_model_parallel_size
    return n, getattr(saved, "mxn_dim_slices", None) or 1


def describe_layout(n: int, m: int) -> str:
    return f"TP={n}" if m == 1 else f"grid {n}x{m} (TP={n * m})"


def loads_distributed_optimizer_state(args, saved) -> bool:
    """Megatron's own rule for reading the distributed optimizer's state on --load."""
    return (getattr(args, "use_distributed_optimizer", False)
            and not getattr(args, "finetune", False)
            and not getattr(args, "no_load_optim", False)
            and not getattr(saved, "no_save_optim", False))


def check_optimizer_layout(args, saved, content_metadata) -> None:
    """Refuse distributed-optimizer state in a per-rank-buffer format saved under another grid:
    rank r's flat buffer would load onto rank r's parameters, whose rows now hold other
    (head, dim) pieces. With the same TP size Megatron's own (TP, PP) check lets it through and
    the Adam moments land on the wrong rows silently."""
    fmt = (content_metadata or {}).get("distrib_optim_sharding_type")
    if fmt is None or fmt in GRID_RESHARDABLE_OPTIM_FORMATS:
        return
    if not loads_distributed_optimizer_state(args, saved):
        return
    theirs, mine = saved_grid(saved), (args.mxn_head_groups, args.mxn_dim_slices)
    if theirs != mine:
        raise MxnConfigError(
            f"checkpoint {args.load} holds distributed-optimizer state in the {fmt} format "
            f"(each rank's flat buffer) saved under {describe_layout(*theirs)}; under this "
            f"run's {describe_layout(*mine)} those buffers would land on other rows of the "
            "attention weights: optimizer state reshards across grids only when saved with "
            "--dist-ckpt-optim-fully-reshardable; or load the model alone with "
            "--no-load-optim (or --finetune)")
