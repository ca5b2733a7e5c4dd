"""A Hugging Face model directory on disk: config.json, safetensors weights (one file or an
index of shards) and the files around them (tokenizer, generation config).

Written back in the reference directory's own layout (same shard files, same tensor -> file
map), so that a round trip reproduces every file's tensors; no transformers import.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Dict, List

import torch

from megatron_mxn.convert.hf_config import ConversionError

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"


def read_config(hf_dir: str) -> dict:
    path = os.path.join(hf_dir, "config.json")
    if not os.path.exists(path):
        raise ConversionError(f"{hf_dir} holds no config.json")
    with open(path) as f:
        return json.load(f)


def weight_map(hf_dir: str) -> Dict[str, str]:
    """Tensor name -> safetensors file (relative to hf_dir)."""
    index = os.path.join(hf_dir, INDEX)
    if os.path.exists(index):
        with open(index) as f:
            return dict(json.load(f)["weight_map"])
    if os.path.exists(os.path.join(hf_dir, SINGLE)):
        from safetensors import safe_open

        with safe_open(os.path.join(hf_dir, SINGLE), "pt") as f:
            return {name: SINGLE for name in f.keys()}
    raise ConversionError(f"{hf_dir} holds neither {SINGLE} nor {INDEX} (only safetensors "
                          "checkpoints are converted)")


def read_weights(hf_dir: str) -> Dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: Dict[str, torch.Tensor] = {}
    for name in sorted(set(weight_map(hf_dir).values())):
        out.update(load_file(os.path.join(hf_dir, name)))
    return out


def write_weights(state: Dict[str, torch.Tensor], out_dir: str, reference_dir: str) -> List[str]:
    """Write `state` into out_dir with reference_dir's file layout; returns the files."""
    from safetensors.torch import save_file

    layout = weight_map(reference_dir)
    if set(layout) != set(state):
        raise ConversionError(
            f"the converted tensors and {reference_dir}'s differ: missing "
            f"{sorted(set(layout) - set(state))[:8]}, extra {sorted(set(state) - set(layout))[:8]}")
    os.makedirs(out_dir, exist_ok=True)
    files = sorted(set(layout.values()))
    for name in files:
        part = {k: state[k].contiguous() for k in sorted(layout) if layout[k] == name}
        save_file(part, os.path.join(out_dir, name), metadata={"format": "pt"})
    if os.path.exists(os.path.join(reference_dir, INDEX)):
        with open(os.path.join(reference_dir, INDEX)) as f:
            index = json.load(f)
        index.setdefault("metadata", {})["total_size"] = sum(
            t.numel() * t.element_size() for t in state.values())
        with open(os.path.join(out_dir, INDEX), "w") as f:
            json.dump(index, f, indent=2)
    return files


def is_weight_file(name: str) -> bool:
    return name.endswith((".safetensors", ".bin", ".pt", ".pth", ".ckpt")) or name == INDEX


def copy_side_files(hf_dir: str, out_dir: str) -> List[str]:
    """Copy config.json, tokenizer and generation files (everything but weights)."""
    os.makedirs(out_dir, exist_ok=True)
    copied = []
    for name in sorted(os.listdir(hf_dir)):
        path = os.path.join(hf_dir, name)
        if os.path.isfile(path) and not is_weight_file(name):
            shutil.copy2(path, os.path.join(out_dir, name))
            copied.append(name)
    return copied
