"""The planner for MLA models (DeepSeek-V3, Kimi-K2): the latent cache per GPU under TP and on
the grid, the largest batch at a cache budget, the decode step's bytes (flat in the context),
the CLI table on both configs, and the refusals (megatron_mxn.analysis.mla)."""

from pathlib import Path

import pytest

from megatron_mxn.analysis import mla
from megatron_mxn.analysis.planner import PRESETS
from megatron_mxn.grid.layout import MxnConfigError
from megatron_mxn.megatron_lm.run_configs import load_config
from megatron_mxn.tools import plan

REPO = Path(__file__).resolve().parent.parent
DSV3, KIMI = str(REPO / "configs" / "deepseek_v3.yaml"), str(REPO / "configs" / "kimi_k2.yaml")
H200 = PRESETS["h200-sxm-2x8"]
GIB = 2**30


def model_of(path: str) -> mla.MlaModel:
    return mla.MlaModel.from_flags(load_config(path)["model"])


def grid(n: int, m: int, pp: int = 1) -> mla.MlaServing:
    return mla.MlaServing(tp=n * m, pp=pp, grid=True, dim_slices=m, cache=mla.POSITIONS)


def test_published_shapes_give_the_published_totals():
    """DeepSeek-V3: 671B parameters (without the MTP module), 58 MoE layers; Kimi-K2: ~1.03T
    (the model card's "1T"), 60 MoE layers; both cache 512 + 64 elements per token and layer."""
    ds, kimi = model_of(DSV3), model_of(KIMI)
    assert round(ds.total_params() / 1e9) == 671 and sum(ds.moe_layers) == 58
    assert not any(ds.moe_layers[:3]) and all(ds.moe_layers[3:])
    assert round(kimi.total_params() / 1e9) == 1026 and sum(kimi.moe_layers) == 60
    assert (ds.latent, kimi.latent, ds.weight_bytes, ds.elem_bytes) == (576, 576, 1, 2)
    assert (ds.heads, kimi.heads, kimi.experts) == (128, 64, 384)


@pytest.mark.parametrize("n,m", [(8, 1), (4, 2), (2, 4), (8, 2), (4, 4), (16, 1)])
def test_latent_cache_per_rank_is_the_nth_part_of_tps(n, m):
    """Grid: s*B*(L+r)*e/(n*m) per layer and rank; TP over the same n*m ranks keeps all of it."""
    model, s, b = model_of(DSV3), 131072, 3
    per_layer = s * b * (512 + 64) * 2 // (n * m)
    assert mla.cache_per_layer(model, grid(n, m), b, s) == per_layer
    assert mla.cache_bytes(model, grid(n, m), b, s) == per_layer * 61
    tp = mla.MlaServing(tp=n * m, cache=mla.LATENT)
    assert mla.cache_bytes(model, tp, b, s) == n * m * per_layer * 61
    # megatron's static (non-absorbed) cache: h/tp heads of a + r + v dims
    static = mla.MlaServing(tp=8, cache=mla.STATIC)
    assert mla.cache_per_layer(model, static, b, s) == s * b * 16 * (128 + 64 + 128) * 2
    # TP=8 PP=2: the latent of 31 layers (61 = 31 + 30) on a GPU of the first stage
    assert mla.cache_bytes(model, mla.MlaServing(tp=8, pp=2), b, s) == s * b * 576 * 2 * 31


@pytest.mark.parametrize("gpus,grids", [(8, [(8, 1), (4, 2), (2, 4)]),
                                        (16, [(16, 1), (8, 2), (4, 4)])])
def test_grid_holds_at_least_3x_tps_batch_at_a_budget(gpus, grids):
    """DeepSeek-V3 at 30 GiB of cache per GPU: the grid's batch is n*m times TP's, up to the
    rounding of TP's small batch (TP=8 at 128K holds 3 sequences, the grid 27)."""
    model = model_of(DSV3)
    for context in (32768 + 256, 131072 + 256):
        tp = mla.largest_batch(model, mla.MlaServing(tp=gpus), 30 * GIB, context)
        for n, m in grids:
            batch = mla.largest_batch(model, grid(n, m), 30 * GIB, context)
            assert batch >= 3 * tp and batch >= (n * m - 1) * tp
    assert mla.largest_batch(model, mla.MlaServing(tp=8), 30 * GIB, 131328) == 3
    assert mla.largest_batch(model, grid(4, 2), 30 * GIB, 131328) == 27


def test_decode_bytes_per_step_do_not_depend_on_the_context():
    """The grid's attention collectives (query all-gather, partials all-to-all) and the whole
    decode step's communication time are the same at 32K and 128K; the hand-computed payloads."""
    model = model_of(DSV3)
    for layout in (grid(4, 2), grid(8, 1), mla.MlaServing(tp=8)):
        short = mla.predict_decode(model, layout, H200, 16, 32768)
        long = mla.predict_decode(model, layout, H200, 16, 131072)
        assert short.attention_sent_B == long.attention_sent_B > 0
        assert short.comm_s == pytest.approx(long.comm_s, rel=1e-12)
        assert long.tpot_s > short.tpot_s  # (the local attention reads more cache)
    records = mla.attention_collectives(model, grid(4, 2), 16)
    gather = [r for r in records if r.op == "all_gather" and r.payload_bytes > 16 * 2112 * 2]
    a2a = [r for r in records if r.op == "all_to_all"]
    # all-gather: 8 ranks x B*(h/n)*(L + r/m) bf16; all-to-all: 8 x B*(h/n)*(L+1) fp32
    assert [r.payload_bytes for r in gather] == [8 * 16 * 32 * (512 + 32) * 2]
    assert [r.payload_bytes for r in a2a] == [8 * 16 * 32 * 513 * 4]
    # m = 2 sends twice the bytes of m = 1 in both (m copies of a head group's partials)
    sent = {nm: mla.decode_bytes_sent(model, grid(*nm), 16) for nm in ((8, 1), (4, 2), (2, 4))}
    assert sent[(8, 1)] < sent[(4, 2)] < sent[(2, 4)]


def test_the_grid_reads_nm_times_less_cache_in_decode():
    model = model_of(DSV3)
    tp = mla.core_cost(model, mla.MlaServing(tp=8), 4, 65536)
    g = mla.core_cost(model, grid(4, 2), 4, 65536)
    assert tp.bytes == 8 * g.bytes
    # the same attention FLOPs per rank (h/8 heads x s positions = h heads x s/8), but for
    # the absorption matmuls' split (the grid's h/n heads x a/m dims = TP's h/tp x a)
    assert g.flops == pytest.approx(tp.flops, rel=1e-3)


@pytest.mark.parametrize("config,gpus", [(DSV3, 8), (DSV3, 16), (KIMI, 8), (KIMI, 16)])
def test_cli_prints_the_mla_budget_table(capsys, config, gpus):
    plan.main(["--config", config, "--kv-budget", "30", "--prompts", "32768,131072",
               "--gpus", str(gpus)])
    out = capsys.readouterr().out
    assert f"(MLA) on 2 x 8 H200 SXM, NVLink + 400 Gb/s IB ({gpus} GPUs)" in out
    assert "512 + 64 elements (2 bytes each); 61 layers" in out
    rows = [line for line in out.splitlines() if line.startswith(("| 32K", "| 128K"))]
    names = {8: ["TP=8 latent", "TP=8 static", "grid 8x1", "grid 4x2", "grid 2x4"],
             16: ["TP=8 PP=2 latent", "TP=16 latent", "TP=16 static", "grid 8x2", "grid 4x4",
                  "grid 16x1", "grid 8x1 PP=2", "grid 4x2 PP=2"]}[gpus]
    assert len(rows) == 2 * len(names)
    for name in names:
        assert any(f"| {name}" in row for row in rows), name
    tp = next(r for r in rows if r.startswith("| 128K") and f"TP={gpus} latent" in r)
    assert tp.endswith("| 1.00x | 1.00x |")
    # the cache per sequence and GPU at 128K (+ 256 new tokens): the whole latent of 61 layers
    # under TP, 1/(n*m) of it on the grid
    assert "| 8.59 GiB | 3 |" in tp
    small = {8: ("grid 4x2 latent", "| 1.07 GiB | 27 |"), 16: ("grid 8x2 latent",
                                                            "| 550.07 MiB | 55 |")}[gpus]
    assert small[1] in next(r for r in rows if r.startswith("| 128K") and small[0] in r)
    if config == KIMI and gpus == 8:  # 1T parameters in fp8 do not fit in 8 x 141 GB
        assert all("(does not fit)" in r for r in rows if "| 0 |" not in r)
    if config == DSV3:
        assert all("(does not fit)" not in r for r in rows)


def test_mla_refusals_name_the_rule(tmp_path):
    model = model_of(DSV3)
    with pytest.raises(MxnConfigError, match=r"qk_pos_emb_head_dim \(64\) must be divisible "
                                             r"by 2\*m \(128\)"):
        mla.check_serving(model, grid(1, 64))
    with pytest.raises(MxnConfigError, match=r"qk_head_dim \(128\) must be divisible by the "
                                             r"dim slices m \(3\)"):
        mla.check_serving(model, grid(2, 3))
    with pytest.raises(MxnConfigError, match=r"num_attention_heads \(128\) must be divisible "
                                             r"by the head groups n \(3\)"):
        mla.check_serving(model, grid(3, 1))
    with pytest.raises(MxnConfigError, match=r"num_attention_heads \(64\) must be divisible by "
                                             r"TP \(128\)"):
        mla.check_serving(model_of(KIMI), mla.MlaServing(tp=128))
    with pytest.raises(MxnConfigError, match="--mxn-kv-cache dims is not modelled"):
        mla.serving_of({"mxn-head-groups": 4, "mxn-dim-slices": 2, "mxn-kv-cache": "dims"}, 8)
    with pytest.raises(MxnConfigError, match="the --kv-budget table only"):
        plan.main(["--config", DSV3])
    with pytest.raises(MxnConfigError, match="names no MLA layout of exactly 4 GPUs"):
        plan.main(["--config", DSV3, "--kv-budget", "30", "--gpus", "4"])
    bad = tmp_path / "bad.yaml"
    bad.write_text(Path(DSV3).read_text().replace(
        "grid_4x2: {mxn-head-groups: 4, mxn-dim-slices: 2,",
        "grid_4x2: {mxn-head-groups: 2, mxn-dim-slices: 4, tensor-model-parallel-size: 6,"))
    with pytest.raises(MxnConfigError, match=r"TP \(6\) must be divisible by the dim slices"):
        plan.main(["--config", str(bad), "--kv-budget", "30", "--gpus", "8"])
    bad.write_text(Path(DSV3).read_text().replace("([0]*3+[1]*58)", "([0]*3+[1]*57)"))
    with pytest.raises(MxnConfigError, match="names 60 layers, the model has 61"):
        plan.main(["--config", str(bad), "--kv-budget", "30", "--gpus", "8"])
