"""Megatron checkpoints of a converted model: written by megatron.training's own save_checkpoint
(torch_dist, tag 'release': `--load CKPT` then starts at iteration 0 and reads no optimizer or
RNG state, under any TP size or grid, since dist-checkpointing reshards), and read back into a
TP=1 model whatever layout saved them.
"""

from __future__ import annotations

import os

from megatron_mxn.convert.hf_config import ConversionError
from megatron_mxn.convert.megatron_model import build_model, global_args

TRACKER = "latest_checkpointed_iteration.txt"


def save_release(model, args) -> str:
    """Save `model` (TP=1, this process's world of one) to args.save as Megatron's 'release'
    checkpoint, with `args` as the checkpoint's args. Returns the step directory."""
    from megatron.training.checkpointing import save_checkpoint

    with global_args(args):
        save_checkpoint(0, [model], None, None, 0, release=True)
    return os.path.join(args.save, "release")


def step_dir(ckpt: str) -> str:
    tracker = os.path.join(ckpt, TRACKER)
    if not os.path.exists(tracker):
        raise ConversionError(f"{ckpt} is not a Megatron checkpoint (no {TRACKER})")
    with open(tracker) as f:
        tag = f.read().strip()
    return os.path.join(ckpt, tag if tag == "release" else f"iter_{int(tag):07d}")


def saved_args(ckpt: str):
    """The args Namespace stored in a torch_dist checkpoint (its common state)."""
    from megatron.core.dist_checkpointing import load_common_state_dict

    path = step_dir(ckpt)
    if not os.path.exists(os.path.join(path, "metadata.json")):
        raise ConversionError(f"{path} is not a torch_dist checkpoint (only --ckpt-format "
                              "torch_dist is read)")
    args = load_common_state_dict(path).get("args")
    if args is None:
        raise ConversionError(f"{path} stores no args; save it with megatron.training")
    return args


def load_tp1_state(ckpt: str, args) -> dict:
    """The checkpoint's model weights as megatron-core's TP=1 state dict (process world of one,
    parallel state at TP=1), read through a model built from `args`."""
    from megatron.core import dist_checkpointing

    model = build_model(args)
    sharded = {"model": model.sharded_state_dict()}
    state = dist_checkpointing.load(sharded, step_dir(ckpt))
    result = model.load_state_dict(state["model"], strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("._extra_state")]
    if missing or result.unexpected_keys:
        raise ConversionError(f"checkpoint {ckpt} does not fit the model: missing {missing[:8]}, "
                              f"unexpected {result.unexpected_keys[:8]}")
    return {k: v for k, v in model.state_dict().items() if not k.endswith("._extra_state")}
