"""Additions to Megatron's training log: per-iteration metrics at full precision
(`--mxn-metrics-file`) and the bytes each group sends per iteration (`--mxn-log-comm`), by
wrapping megatron.training's `training_log` and `train_step` (registered patches of scope
"training-log", installed by megatron_mxn.megatron_lm.flags.resolve_mxn_args when a flag asks).

Imported by the flags module, which every entry point imports before CPU mode is enabled: it
imports megatron.training (and torch) only when a hook is installed, while Megatron parses."""

from __future__ import annotations

from megatron_mxn.patching import patch, replace, resolve

TRAINING = "megatron.training from megatron-core 0.19.x"
TRAINING_LOG = "megatron.training.training.training_log"
TRAIN_STEP = "megatron.training.training.train_step"


@patch(TRAINING_LOG, TRAINING,
       "--mxn-metrics-file: Megatron's log rounds and averages the metrics; the wrapper "
       "appends every iteration's values, as training_log receives them, to a JSON-lines file "
       "(its positional parameters are relied on)", fingerprint="02a4e7b41dea",
       scope="training-log")
def record_metrics(path: str) -> None:
    """Write every training iteration's metrics to `path` (JSON lines, last rank only), from
    the values megatron.training passes to its training_log."""
    import json

    import torch

    if getattr(resolve(TRAINING_LOG), "mxn_metrics_file", None) == path:
        return

    def make(original):
        def training_log(loss_dict, total_loss_dict, learning_rate, iteration, loss_scale,
                         report_memory_flag, skipped_iter, grad_norm, *args, **kwargs):
            if torch.distributed.get_rank() == torch.distributed.get_world_size() - 1:
                row = {"iteration": iteration, "grad norm": _number(grad_norm),
                       "loss scale": _number(loss_scale),
                       "learning rate": _number(learning_rate), "skipped": int(skipped_iter)}
                row.update({k: _number(v) for k, v in loss_dict.items()})
                with open(path, "a") as f:
                    f.write(json.dumps(row) + "\n")
            return original(loss_dict, total_loss_dict, learning_rate, iteration, loss_scale,
                            report_memory_flag, skipped_iter, grad_norm, *args, **kwargs)

        return training_log

    replace(TRAINING_LOG, make)
    resolve(TRAINING_LOG).mxn_metrics_file = path


@patch(TRAIN_STEP, TRAINING,
       "--mxn-log-comm: the wrapper counts every collective one training iteration issues "
       "(forward, backward, gradient reduction, optimizer) and prints the bytes per group",
       fingerprint="1e035d27a23a", scope="training-log")
def log_training_comm(interval: int) -> None:
    """--mxn-log-comm for training: count every collective of each train_step (forward,
    backward, gradient reduction, optimizer) and print, every `interval` iterations on rank 0,
    the bytes it sent per iteration by group."""
    import torch.distributed as dist

    from megatron_mxn.accounting import CommCounter, group_labels  # (imports torch)

    if getattr(resolve(TRAIN_STEP), "mxn_log_comm", False):
        return
    state = {"counts": None, "iterations": 0}

    def make(original):
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

        return train_step

    replace(TRAIN_STEP, make)
    resolve(TRAIN_STEP).mxn_log_comm = True


# (label, ProcessGroupCollection field) of the groups CommCounter names, first match wins


def _number(value):
    if value is None:
        return None
    return float(value.item() if hasattr(value, "item") else value)


# Megatron flags that must agree between a checkpoint and the model it is loaded into.
