"""Megatron-LM integration: `--mxn-*` flags, the grid's TransformerConfig and layer spec.

Used by `scripts/pretrain_gpt_mxn.py` (megatron-core's wheel ships Megatron-LM's training
package) and by the patch for a Megatron-LM checkout's `pretrain_gpt.py` (`patches/`):

    args = parse_and_validate_args(extra_args_provider=with_mxn_args(other_provider))
    model_cfg = mxn_gpt_config_from_args(args)        # instead of gpt_config_from_args(args)
"""

from __future__ import annotations

import argparse
import importlib.util
import os
from typing import Optional

from megatron_mxn.layout import MxnConfigError

from megatron_mxn.schedules import EXACT_SCHEDULES, SCHEDULES as ATTENTION_SCHEDULES


def add_mxn_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Megatron `extra_args_provider`: adds the grid flags and resolves them into
    `--tensor-model-parallel-size` as part of parsing, so Megatron's validation and
    initialization see the grid's TP size."""
    group = parser.add_argument_group("megatron_mxn", "head-group x dim-slice grid attention")
    group.add_argument("--mxn-head-groups", type=int, default=None, metavar="N",
                       help="n: attention head groups. With --mxn-dim-slices M the TP size "
                            "becomes N*M (the grid replaces TP).")
    group.add_argument("--mxn-dim-slices", type=int, default=None, metavar="M",
                       help="m: slices of every head's dims. Alongside "
                            "--tensor-model-parallel-size T it gives N = T/M head groups.")
    group.add_argument("--mxn-attention", choices=ATTENTION_SCHEDULES, default="exact",
                       help="how the grid computes attention. exact (default): partial-score "
                            "all-reduce over the dim-slice group; gather: all-gather of the "
                            "Q/K slices; auto (recommended): per phase and shape the one of "
                            "those two sending fewer bytes. All three compute standard "
                            "attention. sliced: the seed paper's per-slice softmax, a "
                            "DIFFERENT model (h*m heads of d/m dims), never equivalent to "
                            "exact; checkpoints record it and do not mix with exact ones.")
    group.add_argument("--mxn-log-comm", action="store_true",
                       help="count every collective (op, group, bytes, calls) and print a "
                            "per-layer, per-step table (generation) or per-iteration bytes "
                            "per group (training)")
    group.add_argument("--mxn-metrics-file", default=None, metavar="PATH",
                       help="append each iteration's lm loss, grad norm, loss scale and "
                            "learning rate, at full precision, as JSON lines (for A/B "
                            "comparisons; Megatron's log rounds and averages them)")
    _resolve_after_parsing(parser)
    return parser


def with_mxn_args(provider=None):
    """An `extra_args_provider` adding the grid flags after `provider`'s own (if any)."""

    def both(parser):
        return add_mxn_args(provider(parser) if provider is not None else parser)

    return both


def _resolve_after_parsing(parser: argparse.ArgumentParser) -> None:
    """argparse's parse_args goes through parse_known_args: resolve the grid flags there."""
    original = parser.parse_known_args

    def parse_known_args(*args, **kwargs):
        namespace, rest = original(*args, **kwargs)
        return resolve_mxn_args(namespace), rest

    parser.parse_known_args = parse_known_args


def resolve_mxn_args(args: argparse.Namespace) -> argparse.Namespace:
    """Apply the replace/alongside rule (identically on every rank, before any collective).

    * `--mxn-head-groups N --mxn-dim-slices M`: TP becomes N*M ("replace TP").
    * `--tensor-model-parallel-size T --mxn-dim-slices M`: N = T/M ("alongside TP").
    * neither: no grid (plain TP, megatron-core's attention).
    A `--tensor-model-parallel-size` of 1 counts as not given. With `--mxn-metrics-file`,
    per-iteration metrics recording starts here too (so every entry point gets it).
    """
    if getattr(args, "mxn_metrics_file", None):
        record_metrics(args.mxn_metrics_file)
    if getattr(args, "mxn_log_comm", False):
        log_training_comm(args.log_interval)
    n, m, tp = args.mxn_head_groups, args.mxn_dim_slices, args.tensor_model_parallel_size
    for flag, value in (("--mxn-head-groups", n), ("--mxn-dim-slices", m)):
        if value is not None and value < 1:
            raise MxnConfigError(f"{flag} must be >= 1, got {value}")
    if n is None and m is None:
        args.mxn_head_groups, args.mxn_dim_slices = tp, 1
        return args
    if m is None:
        m = 1
    if n is None:
        if tp == 1:
            raise MxnConfigError(
                "--mxn-dim-slices needs --mxn-head-groups (grid replaces TP) or "
                "--tensor-model-parallel-size (grid alongside TP)")
        if tp % m:
            raise MxnConfigError(f"--tensor-model-parallel-size ({tp}) must be divisible by "
                                 f"--mxn-dim-slices ({m})")
        n = tp // m
    elif tp not in (1, n * m):
        raise MxnConfigError(
            f"--tensor-model-parallel-size ({tp}) contradicts --mxn-head-groups {n} x "
            f"--mxn-dim-slices {m} = {n * m}; give the grid or the TP size, not both")
    args.mxn_head_groups, args.mxn_dim_slices = n, m
    args.tensor_model_parallel_size = n * m
    if m > 1 and getattr(args, "context_parallel_size", 1) > 1:
        raise MxnConfigError("context parallelism cannot be combined with --mxn-dim-slices > 1")
    if getattr(args, "mxn_attention", "exact") == "sliced" and m > 1 and \
            os.environ.get("RANK", "0") == "0":
        print(f"> mxn WARNING: --mxn-attention sliced is the seed paper's per-slice softmax, a "
              f"different model from standard attention ({args.num_attention_heads} x {m} "
              f"heads of kv_channels/{m} dims); it is not equivalent to TP or the exact grid "
              "and its checkpoints do not load into them", flush=True)
    if getattr(args, "transformer_impl", None) == "transformer_engine" and not _have_te():
        args.transformer_impl = "local"  # FP16/BF16 linears from megatron-core instead
    return args


def record_metrics(path: str) -> None:
    """Write every training iteration's metrics to `path` (JSON lines, last rank only), from
    the values megatron.training passes to its training_log."""
    import json

    import torch
    from megatron.training import training

    original = training.training_log
    if getattr(original, "mxn_metrics_file", None) == path:
        return

    def training_log(loss_dict, total_loss_dict, learning_rate, iteration, loss_scale,
                     report_memory_flag, skipped_iter, grad_norm, *args, **kwargs):
        if torch.distributed.get_rank() == torch.distributed.get_world_size() - 1:
            row = {"iteration": iteration, "grad norm": _number(grad_norm),
                   "loss scale": _number(loss_scale), "learning rate": _number(learning_rate),
                   "skipped": int(skipped_iter)}
            row.update({k: _number(v) for k, v in loss_dict.items()})
            with open(path, "a") as f:
                f.write(json.dumps(row) + "\n")
        return original(loss_dict, total_loss_dict, learning_rate, iteration, loss_scale,
                        report_memory_flag, skipped_iter, grad_norm, *args, **kwargs)

    training_log.mxn_metrics_file = path
    training.training_log = training_log


def log_training_comm(interval: int) -> None:
    """--mxn-log-comm for training: count every collective of each train_step (forward,
    backward, gradient reduction, optimizer) and print, every `interval` iterations on rank 0,
    the bytes it sent per iteration by group."""
    import torch.distributed as dist
    from megatron.training import training

    from megatron_mxn.accounting import CommCounter

    original = training.train_step
    if getattr(original, "mxn_log_comm", False):
        return
    state = {"counts": None, "iterations": 0}

    def train_step(*args, **kwargs):
        # (looked up each step, not kept: a kept group would outlive destroy_process_group)
        with CommCounter(group_labels()) as counter:
            result = original(*args, **kwargs)
        if state["counts"] is None:
            state["counts"] = counter.counts
        else:
            state["counts"].update(counter.counts)
        state["iterations"] += 1
        if state["iterations"] % max(interval, 1) == 0:
            if dist.get_rank() == 0:
                k = state["iterations"]
                by_group: dict = {}
                for r, calls in state["counts"].items():
                    sent, n = by_group.get(r.group, (0.0, 0))
                    by_group[r.group] = (sent + r.sent_bytes * calls, n + calls)
                print("[mxn] collectives per iteration (rank 0, mean of the last "
                      f"{k % max(interval, 1) or interval}): " + ", ".join(
                          f"{g} {sent / interval / 2**20:.3f} MiB in {n / interval:g} calls"
                          for g, (sent, n) in sorted(by_group.items())), flush=True)
            state["counts"] = None
        return result

    train_step.mxn_log_comm = True
    training.train_step = train_step


# (label, ProcessGroupCollection field) of the groups CommCounter names, first match wins
GROUP_LABELS = (("TP", "tp"), ("dim-slice", None), ("head-group", None), ("PP", "pp"),
                ("DP", "dp"), ("DP+CP", "dp_cp"), ("MP", "mp"), ("EP", "ep"),
                ("TPxEP", "tp_ep"), ("expert-TP", "expt_tp"), ("expert-DP", "expt_dp"),
                ("embedding", "embd"))


def group_labels() -> dict:
    """Names of megatron's and the grid's process groups (after initialization), for
    CommCounter: the same names in the training log, generation reports and the cost model."""
    from megatron.core.process_groups_config import ProcessGroupCollection

    from megatron_mxn.parallel_state import get_grid, mxn_parallel_is_initialized

    pgs = ProcessGroupCollection.use_mpu_process_groups()
    grid = get_grid() if mxn_parallel_is_initialized() else None
    found = {"dim-slice": grid.dim_slice_group if grid else None,
             "head-group": grid.head_group_group if grid else None}
    labels = {}
    for name, field in GROUP_LABELS:
        group = found[name] if field is None else getattr(pgs, field, None)
        if group is not None:
            labels[name] = group
    return labels


def _number(value):
    if value is None:
        return None
    return float(value.item() if hasattr(value, "item") else value)


# Megatron flags that must agree between a checkpoint and the model it is loaded into.
SHAPE_ARGS = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups",
              "kv_channels", "ffn_hidden_size", "num_experts", "padded_vocab_size")


def attention_model(args) -> str:
    """'sliced' for the seed paper's per-slice model, 'standard' for every exact schedule."""
    sliced = getattr(args, "mxn_attention", "exact") == "sliced" and (
        getattr(args, "mxn_dim_slices", 1) or 1) > 1
    return f"sliced over {args.mxn_dim_slices} dim slices" if sliced else "standard"


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
    tag = open(tracker).read().strip()
    step_dir = os.path.join(args.load, tag if tag == "release" else f"iter_{int(tag):07d}")
    if not os.path.exists(os.path.join(step_dir, "metadata.json")):
        return  # not a dist_checkpointing (torch_dist) checkpoint; Megatron's loader checks it
    from megatron.core.dist_checkpointing import load_common_state_dict

    saved = load_common_state_dict(step_dir).get("args")  # local read, no collective
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


def _have_te() -> bool:
    return importlib.util.find_spec("transformer_engine") is not None


def mxn_transformer_config_from_args(args, config_class=None):
    """megatron's TransformerConfig from args, as an MxnTransformerConfig (head counts checked
    against the head groups n, not the TP size). Drop-in for core_transformer_config_from_args;
    `config_class` is accepted for that signature and must be None."""
    if config_class is not None:
        raise MxnConfigError("the grid builds its own TransformerConfig subclass")
    from megatron.training.argument_utils import core_transformer_config_from_args

    from megatron_mxn.config import MxnTransformerConfig

    return core_transformer_config_from_args(args, config_class=MxnTransformerConfig)


def mxn_gpt_config_from_args(args, model_config_cls=None):
    """Megatron's GPTModelConfig from args, with the grid: MxnTransformerConfig and a layer
    spec callable that swaps in the grid attention (megatron's default spec otherwise)."""
    from megatron.training.argument_utils import gpt_config_from_args
    from megatron.training.models.gpt import GPTModelConfig

    cfg = gpt_config_from_args(args, config=mxn_transformer_config_from_args(args),
                               model_config_cls=model_config_cls or GPTModelConfig)
    if args.mxn_dim_slices > 1:
        cfg.transformer_layer_spec = GridLayerSpec(args.mxn_head_groups, args.mxn_dim_slices,
                                                   cfg.transformer_layer_spec)
    return cfg


class GridLayerSpec:
    """`GPTModelConfig.transformer_layer_spec` callable: on first use (right after Megatron's
    initialization, when the model is built) adds the grid sub-groups to parallel_state and
    logs the layout; then returns the base spec with the grid attention."""

    def __init__(self, head_groups: int, dim_slices: int, base=None):
        self.head_groups, self.dim_slices, self.base = head_groups, dim_slices, base

    def __call__(self, model_config, vp_stage: Optional[int] = None):
        from megatron.training.models.gpt import default_layer_spec

        from megatron_mxn.parallel_state import mxn_parallel_is_initialized
        from megatron_mxn.spec import get_mxn_layer_spec

        if not mxn_parallel_is_initialized():
            initialize_grid_after_megatron(self.head_groups, self.dim_slices)
        base = self.base
        if base is None:
            base = default_layer_spec(model_config, vp_stage)
        elif callable(base) and not hasattr(base, "submodules"):
            base = base(model_config)
        rotary = model_config.rotary_percent if model_config.position_embedding_type in (
            "rope", "yarn") else 0.0
        return get_mxn_layer_spec(base, dim_slices=self.dim_slices, rotary_percent=rotary)


def initialize_grid_after_megatron(head_groups: int, dim_slices: int, announce: bool = True):
    """Add the grid sub-groups to Megatron's initialized parallel_state; print the layout."""
    import torch.distributed as dist

    from megatron_mxn.parallel_state import get_grid, initialize_mxn_parallel

    pgs = initialize_mxn_parallel(head_groups, dim_slices)
    if announce and dist.get_rank() == 0:
        print(describe_grid(get_grid()), flush=True)
    return pgs


def describe_grid(grid) -> str:
    """One line: the grid and which global ranks share a dim-slice / head-group group."""
    n, m = grid.head_groups, grid.dim_slices
    slices = [list(grid.tp_global_ranks[i * m:(i + 1) * m]) for i in range(n)]
    heads = [list(grid.tp_global_ranks[j::m]) for j in range(m)]
    return (f"> mxn grid: {n} head groups x {m} dim slices = TP {n * m}; in the TP group of "
            f"rank 0, dim-slice groups (score all-reduce, keep within a node) {slices}, "
            f"head-group groups {heads}")
