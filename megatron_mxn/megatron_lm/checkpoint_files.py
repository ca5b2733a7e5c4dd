"""Is a distributed checkpoint complete on disk? A local check, run before loading.

Megatron loads a torch_dist checkpoint collectively, each rank reading the shard files it
needs. A rank that cannot read one (missing, truncated) raises alone; the other ranks then fail
in their next collective with an error that names no file (gloo: "Connection closed by peer"),
or wait in it for as long as the failing process lives. This check reads only the file system
(no collective), so every rank that runs it before loading stops with the same message.
"""

from __future__ import annotations

import json
import os

from megatron_mxn.grid.layout import MxnConfigError

DCP_METADATA = ".metadata"  # torch.distributed.checkpoint's index of every stored item
CONFIG = "metadata.json"  # dist_checkpointing's backend record, written last by a save
LEGACY_COMMON = "common.pt"  # non-sharded state of torch_dist checkpoints before mcore 0.19


def check_checkpoint_files(step_dir: str) -> None:
    """Raise MxnConfigError unless the iteration directory `step_dir` holds metadata.json, the
    common state and every file its `.metadata` references, each at least as long as the last
    item stored in it (naming every missing or short file). A directory without `.metadata`
    or metadata.json (Megatron's legacy per-rank files) is left to Megatron's loader."""
    if not os.path.isdir(step_dir):
        raise MxnConfigError(f"checkpoint {step_dir} is missing (the tracker file "
                             "latest_checkpointed_iteration.txt names it)")
    has_config = os.path.exists(os.path.join(step_dir, CONFIG))
    backend = _read_config(step_dir).get("sharded_backend") if has_config else None
    if not os.path.exists(os.path.join(step_dir, DCP_METADATA)):
        if backend == "torch_dist":
            raise _damaged(step_dir, f"{DCP_METADATA} is missing")
        return
    metadata = _read_index(step_dir)
    common_inside = any(key.startswith("common_state/") for key in metadata.state_dict_metadata)
    has_common = common_inside or os.path.exists(os.path.join(step_dir, LEGACY_COMMON))
    if has_common and not has_config:
        raise _damaged(step_dir, f"{CONFIG} is missing")
    if has_config and not has_common:
        raise _damaged(step_dir, f"{LEGACY_COMMON} is missing (and {DCP_METADATA} has no "
                                 "common_state item)")
    needed: dict = {}  # file -> bytes the stored items need
    for info in metadata.storage_data.values():
        end = info.offset + info.length
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), end)
    problems = []  # every bad file, so that one attempt shows all of them
    for name, need in sorted(needed.items()):
        path = os.path.join(step_dir, name)
        if not os.path.exists(path):
            problems.append(f"{name} is missing")
        elif os.path.getsize(path) < need:
            problems.append(f"{name} is truncated: {os.path.getsize(path)} bytes, the "
                            f"metadata needs {need}")
    if problems:
        raise _damaged(step_dir, "; ".join(problems))


def _damaged(step_dir: str, what: str) -> MxnConfigError:
    return MxnConfigError(
        f"checkpoint {step_dir} is incomplete: {what} (a torch_dist checkpoint needs "
        f"{CONFIG}, {DCP_METADATA} and every file it references, as long as it lists; restore "
        "the directory, or point latest_checkpointed_iteration.txt at an earlier complete "
        "iteration)")


def _read_config(step_dir: str) -> dict:
    try:
        with open(os.path.join(step_dir, CONFIG)) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise _damaged(step_dir, f"{CONFIG} is unreadable ({e})") from e


def _read_index(step_dir: str):
    from torch.distributed.checkpoint import FileSystemReader

    try:
        return FileSystemReader(step_dir).read_metadata()
    except Exception as e:  # a truncated pickle raises EOFError, UnpicklingError, ...
        raise _damaged(step_dir, f"{DCP_METADATA} is unreadable "
                                 f"({type(e).__name__}: {e})") from e
