"""The Megatron-LM entry points refuse what the grid does not compute exactly while they build
the model config (before any collective), through the same functions scripts/pretrain_*_mxn.py
call: megatron.training's GPTModelBuilder would otherwise swap the grid's core attention for
megatron's DotProductAttention under --attention-backend local, the hybrid builder would drop the
grid's stack spec for a --spec one, and mRoPE must be refused by name. Megatron's MLA flags
build the grid's MLA config (YaRN flags included) and, on the grid and at plain TP, a layer spec
that builds without Transformer Engine; what the grid's MLA does not compute is refused."""

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
# Megatron's MLA flags, YaRN with the --yarn-* flags MLATransformerConfig names without the prefix
MLA = ["--multi-latent-attention", "--q-lora-rank", "48", "--kv-lora-rank", "32",
       "--qk-head-dim", "16", "--qk-pos-emb-head-dim", "8", "--v-head-dim", "12",
       "--qk-layernorm", "--rope-type", "yarn", "--rotary-scaling-factor", "4",
       "--yarn-original-max-position-embeddings", "4", "--yarn-beta-fast", "16",
       "--mscale", "0.9", "--mscale-all-dim", "0.707"]

MOE = ["--num-experts", "4", "--moe-layer-freq", "[0,1]", "--moe-router-topk", "2",
       "--moe-token-dispatcher-type", "alltoall", "--expert-model-parallel-size", "4",
       "--expert-tensor-parallel-size", "1", "--disable-bias-linear",
       "--sequence-parallel"]

CASES = [
    ("gpt", GRID, "ok"),
    ("gpt", [*GRID, *LOCAL], "attention_backend=AttnBackend.local is not supported by the grid "
                             "attention: megatron.training's GPTModelBuilder replaces"),
    ("gpt", [*TP4, *LOCAL], "ok"),  # no grid (m = 1): megatron-core's own attention
    ("gpt", [*GRID, "--position-embedding-type", "mrope", "--mrope-section", "2", "2", "4"],
     "position_embedding_type='mrope' is not supported by the grid attention: multimodal RoPE"),
    ("gpt", [*GRID, *MLA], "ok"),
    ("gpt", [*TP4, *MLA], "ok"),  # megatron's MLA at plain TP, the reference MLA core
    ("gpt", [*GRID, *MLA, *MOE], "ok"),  # (its block spec: tests/test_mla.py)
    ("gpt", [*GRID, *MLA, "--mla-down-proj-fusion"],
     "mla_down_proj_fusion=True is not supported by the grid attention: FusedMLASelfAttention"),
    ("gpt", [*GRID, *MLA, "--rope-type", "rope", "--rotary-percent", "0.5"],
     "rotary_percent=0.5 is not supported by the grid attention: MLA's plain RoPE"),
    ("gpt", [*GRID, *MLA, "--recompute-granularity", "selective", "--recompute-modules",
             "mla_up_proj"], "recompute_modules=['mla_up_proj'] is not supported by the grid"),
    ("gpt", [*TP4, *MLA, *LOCAL], "--multi-latent-attention with --attention-backend local: "
                                  "megatron-core's local DotProductAttention cannot build MLA"),
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
    # MLA: the grid's MLA config with Megatron's MLA and YaRN flags; the grid's spec (which
    # swaps in the grid's MLA) and at plain TP megatron's MLA with the reference core
    flags = [f for _, f, _ in CASES]
    grid, tp = results[flags.index([*GRID, *MLA])], results[flags.index([*TP4, *MLA])]
    for got in (grid, tp):
        assert got["config"] == "MxnMLATransformerConfig", got
        assert got["mla"] == {"q_lora_rank": 48, "kv_lora_rank": 32, "qk_head_dim": 16,
                              "qk_pos_emb_head_dim": 8, "v_head_dim": 12, "rope_type": "yarn",
                              "rotary_scaling_factor": 4.0,
                              "original_max_position_embeddings": 4, "beta_fast": 16.0,
                              "beta_slow": 1.0, "mscale": 0.9, "mscale_all_dim": 0.707}, got
    assert grid["attention"] == ["MxnMLASelfAttention", "MxnMlaDotProductAttention"]
    assert tp["attention"] == ["MLASelfAttention", "MlaDotProductAttention"]
    assert results[flags.index([*GRID, *MLA, *MOE])]["config"] == "MxnMLATransformerConfig"
