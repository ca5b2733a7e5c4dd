"""Additions to Megatron's training log: per-iteration metrics at full precision
(`--mxn-metrics-file`) and the bytes each group sends per iteration (`--mxn-log-comm`), by
wrapping megatron.training's `training_log` and `train_step`."""

from __future__ import annotations


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

    from megatron_mxn.analysis.accounting import CommCounter, group_labels

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


def _number(value):
    if value is None:
        return None
    return float(value.item() if hasattr(value, "item") else value)


# Megatron flags that must agree between a checkpoint and the model it is loaded into.
