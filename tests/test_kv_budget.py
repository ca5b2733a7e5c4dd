"""Batch at an equal KV-cache budget per rank: the largest batch of each layout against
hand-computed KV bytes (the A/B's --kv-budget-mib and the planner's --kv-budget), the A/B's
refusals and table, and the fused TP core (--mxn-tp-core fused) against megatron's."""

from pathlib import Path

import pytest
import torch

from megatron_mxn.analysis import cost_model
from megatron_mxn.analysis.budget import budget_rows, largest_batch
from megatron_mxn.analysis.cost_model import Layout, ModelShape
from megatron_mxn.analysis.planner import PRESETS
from megatron_mxn.grid.layout import MxnConfigError
from megatron_mxn.megatron_lm.run_configs import load_config
from megatron_mxn.tools import ab_compare, kv_budget, plan

REPO = Path(__file__).resolve().parent.parent
CPU_LONG = str(REPO / "configs" / "cpu_long.yaml")
LLAMA70B = str(REPO / "configs" / "llama70b_gqa.yaml")
MIB, GIB = 2**20, 2**30


def test_cpu_long_batches_at_8_mib_per_rank_are_the_hand_computed_ones():
    """cpu_long: 4 layers, g = 2 KV heads of d = 16, fp32; prompt 4096 + 8 new tokens. Per
    sequence and rank: TP=4 keeps 1 whole (replicated) KV head of 4 layers, 2 * 4104 * 16 * 4 B
    * 4 = 2101248 B; TP=2 PP=2 1 head of 2 layers; grid 2x2 (positions) 1 head's 2052 positions
    of 4 layers; grid 1x4 2 heads' 1026 positions: all 1050624 B."""
    cfg = load_config(CPU_LONG)
    got = kv_budget.plan_batches(cfg, ["tp", "tp_fused", "baseline", "grid", "grid_1x4"],
                                 [4096], 8, 8 * MIB)[4096]
    per_seq = {"tp": 2101248, "tp_fused": 2101248, "baseline": 1050624, "grid": 1050624,
               "grid_1x4": 1050624}
    # floor(8 MiB / per sequence); TP=2 PP=2 rounded down to its 2 micro-batches
    want = {"tp": 3, "tp_fused": 3, "baseline": 6, "grid": 7, "grid_1x4": 7}
    for name, row in got.items():
        assert row["per_sequence"] == per_seq[name], name
        assert row["batch"] == want[name], name
        assert row["kv_bytes"] == want[name] * per_seq[name] <= 8 * MIB
        assert (want[name] + row["micro"]) * per_seq[name] > 8 * MIB  # the largest
    assert got["grid"]["batch"] / got["tp"]["batch"] >= 1.8


def test_cpu_mla_batches_at_16_mib_per_rank_are_the_hand_computed_ones():
    """cpu_mla (MLA: 8 heads, qk 16 + RoPE 8 and v 16 dims, kv latent 32; 4 layers, fp32),
    prompt 4096 + 8 new tokens. Per sequence and rank: megatron's MLA at TP=4 caches the
    up-projected K and V of its 2 heads, 4104 * 2 * (16 + 8 + 16) * 4 B * 4 layers = 5253120 B,
    TP=2 PP=2 4 heads of 2 layers, the same; the grid's latent cache (32 + 8 per position)
    sharded by position over the 4 ranks: 1026 * 40 * 4 B * 4 layers = 656640 B (grid 2x2 and
    1x4 alike)."""
    cfg = load_config(str(REPO / "configs" / "cpu_mla.yaml"))
    model = ModelShape.from_flags(cfg["model"])
    assert (model.mla, model.kv_lora_rank, model.qk_head_dim, model.qk_pos_emb_head_dim,
            model.v_head_dim) == (True, 32, 16, 8, 16)
    got = kv_budget.plan_batches(cfg, ["tp", "baseline", "grid", "grid_1x4"], [4096], 8,
                                 16 * MIB)[4096]
    per_seq = {"tp": 5253120, "baseline": 5253120, "grid": 656640, "grid_1x4": 656640}
    want = {"tp": 3, "baseline": 2, "grid": 25, "grid_1x4": 25}  # (TP=2 PP=2: 2 micro-batches)
    for name, row in got.items():
        assert (row["per_sequence"], row["batch"]) == (per_seq[name], want[name]), name
    with pytest.raises(MxnConfigError, match="for MLA it computes the KV cache only"):
        cost_model.layer_weight_bytes(model, Layout(tp=4))
    with pytest.raises(MxnConfigError, match=r"qk_pos_emb_head_dim \(8\) must be divisible by "
                                             r"2\*m \(16\)"):
        cost_model.check_layout(model, Layout(tp=8, dim_slices=8))
    cost_model.check_layout(model, Layout(tp=4, dim_slices=2))


def test_largest_batch_refuses_nonsense_and_reports_zero_when_nothing_fits():
    model = ModelShape.from_flags(load_config(CPU_LONG)["model"])
    layout = Layout(tp=4)
    assert largest_batch(model, layout, 2101247, 4104) == 0
    assert largest_batch(model, layout, 2101248, 4104) == 1
    assert largest_batch(model, Layout(tp=2, pp=2), 1050624, 4104) == 0  # 2 micro-batches
    assert largest_batch(model, Layout(tp=2, pp=2), 2 * 1050624, 4104) == 2
    for budget, context in ((0, 4104), (1e6, 0)):
        with pytest.raises(MxnConfigError, match="must be positive"):
            largest_batch(model, layout, budget, context)


def test_ab_driver_refuses_a_bad_kv_budget_request(capsys):
    cfg = ["--config", CPU_LONG]
    assert ab_compare.parse_args(cfg + ["--kv-budget-mib", "8"]).kv_budget_mib == 8
    for extra, why in ((["--kv-budget-mib", "0"], "--kv-budget-mib must be > 0"),
                       (["--kv-budget-mib", "8", "--batch-size", "4"],
                        "sets each layout's batch; drop --batch-size"),
                       (["--kv-budget-mib", "8", "--config", CPU_LONG],
                        "goes with a single --config")):
        with pytest.raises(SystemExit):
            ab_compare.parse_args(cfg + extra)
        assert why in capsys.readouterr().err


def _report(name: str, tps: float, kv: int) -> dict:
    repeat = {"output_tokens_per_s": tps, "total_tokens_per_s": tps, "ttft_s": 1.0,
              "tpot_s": {"median": 0.1, "p90": 0.2}}
    return {"layout": {"name": name}, "kv_cache_bytes_per_rank": kv, "repeats": [repeat] * 2}


def test_budget_table_gives_batch_and_tokens_per_s_against_tp():
    results = {4096: {
        "tp": dict(batch=3, kv_bytes=3 * 2101248, report=_report("TP=4", 10.0, 3 * 2101248),
                   why=None),
        "grid": dict(batch=7, kv_bytes=7 * 1050624,
                     report=_report("grid 2x2", 25.0, 7 * 1050624), why=None),
        "baseline": dict(batch=6, kv_bytes=0, report=None, why="too large, said so")}}
    text = "\n".join(kv_budget.budget_table("r", "cmd", 2, 8, results))
    # decode tokens/s: batch / TPOT = 70 against TP=4's 30
    assert "| grid 2x2 | 7 | 7.01 MiB | 25.0 [25.0-25.0] | 70.0 | 100.0 [100.0-100.0] | " \
           "1000.0 [1000.0-1000.0] | x2.33 | x2.50 | x2.33 | n/a |" in text
    assert "| baseline | 6 | 0.00 KiB | skipped |" in text
    assert "Skipped baseline: too large, said so." in text


def test_planner_kv_budget_rows_for_a_70b_gqa_model_on_16_gpus(capsys):
    """Llama-3-70B's shape (80 layers, g = 8 KV heads of 128, bf16) at 40 GiB per GPU and a 32K
    prompt + 256 new tokens (33024 positions). TP=16 > g keeps 1 whole KV head per GPU (each
    head on 2 GPUs): 2 * 33024 * 128 * 2 B * 80 = 1352663040 B per sequence; the grid 8x2 keeps
    1 head's 16512 positions, TP=8 PP=2 1 head of 40 layers: half of that."""
    cfg = load_config(LLAMA70B)
    model = ModelShape.from_flags(cfg["model"])
    layouts = {n: next(x for x in xs if x.schedule == "auto") if len(xs) > 1 else xs[0]
               for n, xs in plan.config_layouts(cfg, 16).items()}
    rows = {r.name: r for r in budget_rows(model, PRESETS["h100-sxm-2x8"], layouts, 40 * GIB,
                                           [32768], 256, prefill_chunk=256)}
    per_seq = 2 * 33024 * 128 * 2 * 80
    assert rows["tp"].per_sequence_B == per_seq
    assert rows["grid"].per_sequence_B == rows["baseline"].per_sequence_B == per_seq // 2
    assert rows["tp"].batch == 40 * GIB // per_seq == 31
    assert rows["grid"].batch == rows["grid_4x4"].batch == 40 * GIB // (per_seq // 2) == 63
    assert rows["baseline"].batch == 62  # (2 micro-batches)
    assert rows["tp8_dp2"].batch == 2 * 31  # (31 per TP=8 replica, 2 replicas)
    assert rows["grid"].prediction.tpot_s > 0 and rows["grid"].decode_tokens_per_s == \
        pytest.approx(63 / rows["grid"].prediction.tpot_s)
    plan.main(["--config", LLAMA70B, "--kv-budget", "40", "--prompts", "32768,131072",
               "--prefill-chunk", "256"])
    out = capsys.readouterr().out
    assert "the largest batch at 40 GiB of KV cache per GPU, 256 new tokens" in out
    assert "| 32K | TP=16 (config: tp) | 1.26 GiB | 31 | " in out
    assert "| 32K | grid 8x2 auto KV-by-position (config: grid) | 645.00 MiB | 63 | " in out
    assert "| 128K | TP=16 (config: tp) | 5.01 GiB | 7 | " in out
    with pytest.raises(MxnConfigError, match="--kv-budget must be > 0"):
        plan.main(["--config", LLAMA70B, "--kv-budget", "0"])


# ---------------------------------------------------------------- the fused TP core
@pytest.fixture(scope="module")
def one_rank_cores():
    """megatron's DotProductAttention and the fused core on one rank, in this process."""
    import megatron_mxn.cpu
    from megatron.core import parallel_state
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_mxn.attention.fused_core import FusedDotProductAttention

    class OneRank:  # (a TP group of one rank: all DotProductAttention asks of it)
        def size(self):
            return 1

        def rank(self):
            return 0

    megatron_mxn.cpu.enable()
    if parallel_state._GLOBAL_MEMORY_BUFFER is None:
        parallel_state._set_global_memory_buffer()
    tracker = get_cuda_rng_tracker()
    if "model-parallel-rng" not in tracker.get_states():
        tracker.add("model-parallel-rng", 1)
    cfg = TransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=4,
                            num_query_groups=2, kv_channels=16, attention_dropout=0.0,
                            use_cpu_initialization=True)
    kw = dict(config=cfg, layer_number=1, attn_mask_type=AttnMaskType.causal,
              attention_type="self", pg_collection=ProcessGroupCollection(tp=OneRank()))
    return DotProductAttention(**kw), FusedDotProductAttention(**kw), AttnMaskType


def test_fused_tp_core_computes_megatrons_attention(one_rank_cores):
    """Prefill (causal, sq = sk) and a decode step after a KV cache (sq = 1, megatron passes
    no_mask), GQA with 2 query heads per KV head: the same output to fp32 rounding."""
    ref, fused, mask_type = one_rank_cores
    g = torch.Generator().manual_seed(0)
    q = torch.randn(12, 3, 4, 16, generator=g)
    k, v = torch.randn(12, 3, 2, 16, generator=g), torch.randn(12, 3, 2, 16, generator=g)
    out = fused(q, k, v, None)
    assert out.shape == (12, 3, 64)
    torch.testing.assert_close(out, ref(q, k, v, None), atol=2e-6, rtol=1e-5)
    step = dict(attn_mask_type=mask_type.no_mask)
    torch.testing.assert_close(fused(q[-1:], k, v, None, **step), ref(q[-1:], k, v, None, **step),
                               atol=2e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="neither packed sequences nor an attention bias"):
        fused(q, k, v, None, attention_bias=torch.zeros(1))


def test_a_model_labelled_fused_must_run_the_fused_core(one_rank_cores):
    from megatron.core.transformer.attention import SelfAttention

    from megatron_mxn.attention.fused_core import check_fused_model

    ref, fused, _ = one_rank_cores

    def model_with(core):
        attn = SelfAttention.__new__(SelfAttention)
        torch.nn.Module.__init__(attn)
        attn.core_attention = core
        return torch.nn.Sequential(attn)

    assert check_fused_model(model_with(fused)) == 1
    with pytest.raises(MxnConfigError, match=r"runs \['DotProductAttention'\]"):
        check_fused_model(model_with(ref))


def test_fused_tp_core_is_for_plain_tp_only():
    import argparse

    from megatron_mxn.megatron_lm.flags import resolve_mxn_args

    args = argparse.Namespace(mxn_head_groups=2, mxn_dim_slices=2, tensor_model_parallel_size=1,
                              mxn_tp_core="fused", mxn_attention="auto")
    with pytest.raises(MxnConfigError, match="--mxn-tp-core fused is for plain TP"):
        resolve_mxn_args(args)
    args = argparse.Namespace(mxn_head_groups=None, mxn_dim_slices=None,
                              tensor_model_parallel_size=4, mxn_tp_core="fused")
    assert resolve_mxn_args(args).mxn_dim_slices == 1


def test_fused_tp_spec_replaces_every_core_once_also_in_a_shared_block_spec():
    """An MoE block spec lists one layer spec object for several layers: each is replaced once
    (the second visit must not refuse the fused core it already put there)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    from megatron_mxn.attention.fused_core import FusedDotProductAttention
    from megatron_mxn.attention.spec import get_fused_tp_layer_spec

    layer = get_gpt_layer_local_spec()
    block = get_fused_tp_layer_spec(TransformerBlockSubmodules(layer_specs=[layer, layer]))
    for spec in block.layer_specs:
        assert spec.submodules.self_attention.submodules.core_attention is \
            FusedDotProductAttention
    assert layer.submodules.self_attention.submodules.core_attention is DotProductAttention
