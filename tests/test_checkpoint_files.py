"""The local integrity check of a torch_dist checkpoint (megatron_mxn.megatron_lm.checkpoint_files), on a
small checkpoint written by torch.distributed.checkpoint in the layout Megatron's torch_dist
uses: shard files, `.metadata`, metadata.json, the common state as a `common_state/` item.
The same check through the pretrain entry point: tests/test_training.py."""

import io
import json
import os
import re

import pytest
import torch
import torch.distributed.checkpoint as dcp

from megatron_mxn.megatron_lm.checkpoint_files import check_checkpoint_files
from megatron_mxn.grid.layout import MxnConfigError

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


@pytest.fixture
def step_dir(tmp_path):
    path = tmp_path / "iter_0000002"
    state = {"common_state/shard_0_1": io.BytesIO(b"args and iteration"),
             "weight": torch.arange(1000, dtype=torch.float32)}
    dcp.save(state, checkpoint_id=str(path), no_dist=True)
    (path / "metadata.json").write_text(json.dumps(
        {"sharded_backend": "torch_dist", "sharded_backend_version": 1}))
    return path


def _shard(step_dir):
    (shard,) = step_dir.glob("*.distcp")
    return shard


def test_a_complete_checkpoint_passes(step_dir):
    check_checkpoint_files(str(step_dir))


def test_a_directory_without_dist_metadata_is_left_to_megatron(tmp_path):
    (tmp_path / "mp_rank_00").mkdir()  # Megatron's legacy per-rank checkpoint
    check_checkpoint_files(str(tmp_path))


@pytest.mark.parametrize("damage,message", [
    (lambda d: _shard(d).unlink(), r"__0_0\.distcp is missing"),
    (lambda d: (d / ".metadata").unlink(), r"\.metadata is missing"),
    (lambda d: os.truncate(d / ".metadata", 50), r"\.metadata is unreadable"),
    (lambda d: (d / "metadata.json").unlink(), r"metadata\.json is missing"),
    (lambda d: (d / "metadata.json").write_text("{"), r"metadata\.json is unreadable"),
], ids=["shard-missing", "index-missing", "index-truncated",
        "config-missing", "config-unreadable"])
def test_a_damaged_checkpoint_is_named(step_dir, damage, message):
    damage(step_dir)
    with pytest.raises(MxnConfigError,
                       match=f"checkpoint {re.escape(str(step_dir))} is incomplete: {message}"):
        check_checkpoint_files(str(step_dir))


def test_a_truncated_shard_is_named_with_both_sizes(step_dir):
    """An intact shard file ends exactly where its last stored item does: one byte less is
    truncated."""
    size = _shard(step_dir).stat().st_size
    os.truncate(_shard(step_dir), size - 1)
    with pytest.raises(MxnConfigError, match=f"truncated: {size - 1} bytes, the metadata needs "
                                             f"{size} "):
        check_checkpoint_files(str(step_dir))


def test_a_missing_step_directory_is_named(tmp_path):
    with pytest.raises(MxnConfigError, match="iter_0000004 is missing"):
        check_checkpoint_files(str(tmp_path / "iter_0000004"))


def test_a_legacy_checkpoint_needs_its_common_pt(tmp_path):
    """Before megatron-core 0.19 the common state was a separate common.pt, not an item."""
    dcp.save({"weight": torch.ones(10)}, checkpoint_id=str(tmp_path), no_dist=True)
    (tmp_path / "metadata.json").write_text('{"sharded_backend": "torch_dist"}')
    with pytest.raises(MxnConfigError, match="common.pt is missing"):
        check_checkpoint_files(str(tmp_path))
    torch.save({"args": None}, tmp_path / "common.pt")
    check_checkpoint_files(str(tmp_path))



def test_every_bad_file_is_named(tmp_path):
    """All missing and short files in one message: one attempt shows the whole damage."""
    writer = dcp.FileSystemWriter(str(tmp_path), single_file_per_rank=False)  # a file per item
    dcp.save({f"w{k}": torch.ones(100) for k in range(3)}, storage_writer=writer, no_dist=True)
    (tmp_path / "metadata.json").write_text('{"sharded_backend": "torch_dist"}')
    torch.save({}, tmp_path / "common.pt")
    first, _, third = sorted(tmp_path.glob("*.distcp"))
    first.unlink()
    os.truncate(third, 10)
    with pytest.raises(MxnConfigError, match=f"incomplete: {first.name} is missing; "
                                             f"{third.name} is truncated: 10 bytes"):
        check_checkpoint_files(str(tmp_path))
