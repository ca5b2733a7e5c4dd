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
from megatron_mxn.convert.hf_run import check_same_model, tokenizer_flags
from megatron_mxn.convert.megatron_model import build_model, megatron_args, run_flags


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
