"""The Megatron-LM entry points refuse what the grid does not compute exactly while they build
the model config (before any collective), through the same functions scripts/pretrain_*_mxn.py
call: megatron.training's GPTModelBuilder would otherwise swap the grid's core attention for
megatron's DotProductAttention under --attention-backend local, the hybrid builder would drop the
grid's stack spec for a --spec one, and mRoPE must be refused by name."""

import json
import subprocess
import sys

import pytest

from tests.launch import REPO, TINY_GPT

pytestmark = pytest.mark.launches  # (conftest: not in `make test-fast`)

GRID = ["--mxn-head-groups", "2", "--mxn-dim-slices", "2"]
TP4 = ["--tensor-model-parallel-size", "4"]
LOCAL = ["--attention-backend", "local", "--spec", "local", "core"]  # Megatron needs --spec local
HYBRID = ["--hybrid-layer-pattern", "*-*-"]
BASE = [*TINY_GPT, "--mock-data", "--train-iters", "1"]
# Megatron refuses MLA with GQA: the tiny GPT without its query groups
MLA_BASE = [f for k, f in enumerate(BASE) if f != "--group-query-attention"
            and "--num-query-groups" not in BASE[max(k - 1, 0):k + 1]]

CASES = [
    ("gpt", GRID, "ok"),
    ("gpt", [*GRID, *LOCAL], "attention_backend=AttnBackend.local is not supported by the grid "
                             "attention: megatron.training's GPTModelBuilder replaces"),
    ("gpt", [*TP4, *LOCAL], "ok"),  # no grid (m = 1): megatron-core's own attention
    ("gpt", [*GRID, "--position-embedding-type", "mrope", "--mrope-section", "2", "2", "4"],
     "position_embedding_type='mrope' is not supported by the grid attention: multimodal RoPE"),
    ("gpt", [*GRID, "--multi-latent-attention"],
     "multi_latent_attention=True is not supported by the grid's Megatron-LM entry points"),
    ("hybrid", [*GRID, *HYBRID], "ok"),
    ("hybrid", [*GRID, *HYBRID, "--spec", "my.module", "stack"],
     "--spec my.module stack would replace the grid's hybrid stack spec"),
]


def test_entry_points_refuse_options_while_building_the_model_config():
    cases = [[entry, [*(MLA_BASE if "--multi-latent-attention" in flags else BASE), *flags]]
             for entry, flags, _ in CASES]
    run = subprocess.run([sys.executable, "-m", "tests.cases.entry_options", json.dumps(cases)],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    results = [json.loads(line[len("RESULT "):]) for line in run.stdout.splitlines()
               if line.startswith("RESULT ")]
    assert len(results) == len(CASES), run.stdout[-3000:] + run.stderr[-3000:]
    for (entry, flags, want), got in zip(CASES, results):
        if want == "ok":
            assert got.get("ok"), (entry, flags, got)
        else:
            assert want in got.get("refused", ""), (entry, flags, got)
    # the grid's layer spec; Megatron's default apply_rope_fusion=True turned off by the grid's
    # flags (options.py refuses TE's fused RoPE on the grid), kept without the grid
    assert results[0]["spec"] == "GridLayerSpec"
    assert results[0]["rope_fusion_after_parsing"] is False
    assert results[2]["rope_fusion_after_parsing"] is True
