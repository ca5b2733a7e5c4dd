"""Multi-latent attention (MLA) on the grid computes megatron-core's MLA exactly.

Worker-pool cases: grid 2x2 and 1x4 against megatron-core's MLA at TP=1 (local spec, the
plugin's reference core), fp32, logits, loss and every parameter gradient within 1e-5 (worst
element relative to the tensor's max); q_lora_rank set and unset, YaRN and plain RoPE, the score
schedules (exact, gather) and the sequence-split core (seq, auto), sequence parallelism, a
padding mask and selective recompute of the core; a TP=1 checkpoint loads on the grid, and a
grid checkpoint loads on the grid and at TP=1.
In-process cases: the reference core is the formula, the kernels take a value head dim of their
own, the layout covers every row once, and what is not supported is refused at build time.
"""

import re
import types

import pytest
import torch
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.spec_utils import build_module

import megatron_mxn
from megatron_mxn import MxnConfigError
from megatron_mxn.attention import kernels, options
from megatron_mxn.attention.mask import MaskSpec
from megatron_mxn.attention.mla import MxnMLASelfAttention
from megatron_mxn.attention.mla_decode import check_kv_cache_request
from megatron_mxn.attention.mla_core import MlaDotProductAttention, with_mla_core
from megatron_mxn.grid.mla_layout import MlaLayout
from tests.cases.mla import (
    MlaModel,
    compare_mla_with_tp1,
    decode_matches_tp1,
    grid_roundtrip,
    make_config,
)

TOL = 1e-5

# name: (n, m, schedule and model settings)
CASES = {
    "q_lora_yarn_2x2": (2, 2, {"schedule": "exact"}),
    "no_q_lora_yarn_1x4": (1, 4, {"schedule": "seq", "q_lora_rank": None,
                                  "qk_layernorm": False}),
    "rope_2x2_seq": (2, 2, {"schedule": "seq", "rope_type": "rope"}),
    "rope_no_q_lora_1x4_gather": (1, 4, {"schedule": "gather", "rope_type": "rope",
                                         "q_lora_rank": None, "qk_layernorm": False}),
    "auto_sequence_parallel_2x2": (2, 2, {"schedule": "auto", "sp": True}),
    "padding_mask_seq_1x4": (1, 4, {"schedule": "seq", "padding_mask": True}),
    "no_latent_norms_exact_1x4": (1, 4, {"schedule": "exact", "qk_layernorm": False}),
    "recompute_core_attn_seq_2x2": (2, 2, {"schedule": "seq", "recompute": True}),
    # m = 1: the grid's MLA over 4 head groups (megatron's own MLA at TP=4 gets two gradients
    # wrong, design.md section 7)
    "q_lora_yarn_4x1": (4, 1, {"schedule": "auto"}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_mla_matches_tp1(pool4, tmp_path, name):
    n, m, extra = CASES[name]
    # the first case goes through a TP=1 dist_checkpointing checkpoint, the others in memory
    ckpt = str(tmp_path) if name == "q_lora_yarn_2x2" else None
    results = pool4.run(compare_mla_with_tp1, n=n, m=m, ckpt_dir=ckpt, **extra)
    with_logits = [r for r in results if "logits" in r]
    assert with_logits
    for r in with_logits:
        assert r["logits"] < TOL and r["loss"] < TOL, (r["logits"], r["loss"])
    for r in results:
        assert r["weights"] == 0.0
        worst = max(r["grad"], key=r["grad"].get)
        assert r["grad"][worst] < TOL, (worst, r["grad"][worst])
        assert any("linear_kv_up_proj" in k for k in r["grad"])
    print(f"{name}: logits {with_logits[0]['logits']:.1e}, worst grad "
          f"{max(max(r['grad'].values()) for r in results):.1e}")


def test_mla_grid_checkpoint_loads_on_grid_and_tp1(pool4, tmp_path):
    """A grid 2x2 checkpoint loads, bit-identically, into the grid and into megatron's TP=1."""
    errors = pool4.run(grid_roundtrip, n=2, m=2, ckpt_dir=str(tmp_path))
    for e in errors:
        assert sorted(e) == ["grid", "tp1"]
        for layout in e.values():
            assert layout and max(layout.values()) == 0.0, layout


# ---------------------------------------------------------------- in-process
def _formula(q, k, v, scale, mask):
    """float64 softmax(q k^T scale + mask) v, [s, b, h, d] layout."""
    q, k, v = (t.double().permute(1, 2, 0, 3) for t in (q, k, v))
    scores = (q @ k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(mask, float("-inf"))
    return (torch.softmax(scores, -1) @ v).permute(2, 0, 1, 3)


def test_reference_core_is_the_formula():
    config = make_config(MlaModel(), tp=1)
    tp1 = types.SimpleNamespace(tp=types.SimpleNamespace(size=lambda: 1))
    core = MlaDotProductAttention(config, 1, AttnMaskType.causal, "self", softmax_scale=0.3,
                                  k_channels=24, v_channels=12, pg_collection=tp1)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(7, 2, 8, 24, generator=g), torch.randn(7, 2, 8, 24, generator=g)
    v = torch.randn(7, 2, 8, 12, generator=g)
    causal = torch.ones(7, 7, dtype=torch.bool).triu(1)
    out = core(q, k, v, None)
    assert out.shape == (7, 2, 8 * 12)
    want = _formula(q, k, v, 0.3, causal).reshape(7, 2, -1)
    assert (out.double() - want).abs().max() < 1e-6
    padded = causal.expand(2, 1, 7, 7).clone()
    padded[1, :, :, 5:] = True
    padded[1, :, 5:] = causal[5:]
    out = core(q, k, v, padded)
    assert (out.double() - _formula(q, k, v, 0.3, padded).reshape(7, 2, -1)).abs().max() < 1e-6


@pytest.mark.parametrize("dv", [6, 20])
def test_kernels_take_a_value_head_dim_of_its_own(dv):
    """q/k with 12 dims, v with fewer or more: the fused path (a causal chunk at an offset, and
    a padding mask) against float64 attention, forward and dQ/dK/dV."""
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 4, 5, 12, generator=g, requires_grad=True)
    k = torch.randn(2, 2, 9, 12, generator=g, requires_grad=True)
    v = torch.randn(2, 2, 9, dv, generator=g, requires_grad=True)
    for mask in (MaskSpec.of(True, 4, None, None),
                 MaskSpec.of(False, 0, None, torch.rand(2, 1, 5, 9, generator=g) > 0.7)):
        out = kernels.attention(q, k, v, scale=0.25, mask=mask)
        assert out.shape == (2, 4, 5, dv)
        kk, vv = (t.repeat_interleave(2, dim=1) for t in (k, v))
        scores = (q.double() @ kk.double().transpose(-1, -2)) * 0.25
        scores = scores.masked_fill(mask.tensor(5, 9, q.device), float("-inf"))
        want = torch.softmax(scores, -1).nan_to_num(0.0) @ vv.double()
        assert (out.double() - want).abs().max() < 1e-5
        grad = torch.randn(out.shape, generator=g)
        got = torch.autograd.grad(out, (q, k, v), grad)
        ref = torch.autograd.grad(want, (q, k, v), grad.double())
        for a, b in zip(got, ref):
            assert (a.double() - b).abs().max() < 1e-5


@pytest.mark.parametrize("n,m", [(1, 4), (2, 2), (4, 2), (2, 1)])
def test_mla_layout_covers_every_row_once(n, m):
    layout = MlaLayout(n, m, num_heads=8, qk_head_dim=16, rope_dim=8, v_head_dim=12)
    for rows, total in ((layout.q_rows, 8 * 24), (layout.kv_up_rows, 8 * 28),
                        (layout.proj_columns, 8 * 12)):
        every = sorted(x for i, j in layout.ranks() for x in rows(i, j))
        assert every == list(range(total))
        assert all(len(rows(i, j)) == total // (n * m) for i, j in layout.ranks())
    for j in range(m):  # whole RoPE pairs (2k, 2k+1) and their frequency k in both halves
        dims = layout.rope_dims(j)
        assert dims[0] % 2 == 0 and len(dims) % 2 == 0
        pairs = [d // 2 for d in dims[::2]]
        assert layout.rotary_freq_index(j) == pairs + [4 + p for p in pairs]


def test_mla_layout_refuses_what_does_not_split():
    with pytest.raises(MxnConfigError, match=r"qk_pos_emb_head_dim \(8\) must be divisible by "
                                             r"2\*m \(16\)"):
        MlaLayout(1, 8, num_heads=8, qk_head_dim=16, rope_dim=8, v_head_dim=16)
    with pytest.raises(MxnConfigError, match=r"v_head_dim \(12\) must be divisible"):
        MlaLayout(1, 8, num_heads=8, qk_head_dim=16, rope_dim=16, v_head_dim=12)


def _grid_mla_spec():
    spec = with_mla_core(get_gpt_layer_local_spec(multi_latent_attention=True,
                                                  qk_layernorm=True))
    return megatron_mxn.get_mxn_layer_spec(spec, dim_slices=2).submodules.self_attention


REFUSED = sorted((name, table) for table in ("MLA_OPTIONS", "MLA_RESTRICTIONS")
                 for name, o in getattr(options, table).items() if o.kind == options.REFUSED)


@pytest.mark.parametrize("name,table", REFUSED)
def test_mla_refuses_at_build_time(name, table):
    """Every MLA option the grid does not compute is refused when the layer is built, first
    thing (no process group exists here), naming the option."""
    option = getattr(options, table)[name]
    config = make_config(MlaModel(rope_type="rope"), tp=4, m=2)
    setattr(config, name, option.example)
    with pytest.raises(MxnConfigError) as err:
        build_module(_grid_mla_spec(), config=config, layer_number=2)
    assert str(err.value).startswith("layer 2: " + option.message(name, option.example))


def test_standard_grid_attention_refuses_an_mla_config():
    """An MLA config with the standard attention spec would attend with the wrong heads: the
    standard grid layer refuses it first thing."""
    spec = megatron_mxn.get_mxn_layer_spec(get_gpt_layer_local_spec(), dim_slices=2)
    with pytest.raises(MxnConfigError, match="multi_latent_attention is set but the layer spec "
                                             "builds SelfAttention"):
        build_module(spec.submodules.self_attention, config=make_config(MlaModel(), tp=4, m=2),
                     layer_number=1)


def test_mla_refuses_packed_sequences_and_a_dims_kv_cache():
    for requested in (None, "auto", "positions"):
        check_kv_cache_request(requested)
    with pytest.raises(MxnConfigError, match="latent KV cache sharded by position"):
        check_kv_cache_request("dims")
    layer = MxnMLASelfAttention.__new__(MxnMLASelfAttention)
    torch.nn.Module.__init__(layer)
    with pytest.raises(MxnConfigError, match="packed sequences"):
        layer(torch.zeros(4, 1, 64), None, packed_seq_params=object())


def test_mla_spec_refuses_fused_mla_and_other_cores():
    from megatron.core.transformer.multi_latent_attention import FusedMLASelfAttention

    base = get_gpt_layer_local_spec(multi_latent_attention=True)
    base.submodules.self_attention.module = FusedMLASelfAttention
    with pytest.raises(MxnConfigError, match="FusedMLASelfAttention"):
        megatron_mxn.get_mxn_layer_spec(base, dim_slices=2)
    base = get_gpt_layer_local_spec(multi_latent_attention=True)
    base.submodules.self_attention.submodules.core_attention = torch.nn.Identity
    with pytest.raises(MxnConfigError, match="MLA spec's core_attention"):
        megatron_mxn.get_mxn_layer_spec(base, dim_slices=2)



# ---------------------------------------------------------------- decode: the latent cache
# name: (n, m, case settings)
DECODE_CASES = {
    "yarn_2x2": (2, 2, {}),
    "rope_no_q_lora_1x4": (1, 4, {"rope_type": "rope", "q_lora_rank": None,
                                  "qk_layernorm": False}),
    "ragged_chunked_2x2": (2, 2, {"prompt": 9, "prompt_lengths": [9, 5, 3],
                                  "batch_size": 3, "prefill_chunk": 4}),
    "yarn_4x1": (4, 1, {}),
}


@pytest.mark.parametrize("name", list(DECODE_CASES))
def test_mla_decode_matches_tp1(pool4, name):
    """Greedy decode with the latent cache sharded by position over the 4 ranks gives
    megatron's MLA at TP=1 (its static cache of up-projected K/V) the same tokens and logits;
    each rank holds 1/4 of the latent cache TP would hold."""
    n, m, extra = DECODE_CASES[name]
    results = pool4.run(decode_matches_tp1, n=n, m=m, **extra)
    r = results[0]
    assert all(x["tokens_equal"] for x in results), (r["tokens"],)
    assert max(x["logits"] for x in results) < TOL, [x["logits"] for x in results]
    layers, latent, batch = 2, 32 + 8, extra.get("batch_size", 2)
    tp_latent = layers * r["context"] * batch * latent * 4  # what every TP rank would hold
    for x in results:
        assert x["kv_cache"] == "latent-positions"
        assert x["cache_bytes"] == layers * -(-r["context"] // 4) * batch * latent * 4
        assert x["cache_bytes"] * 4 < tp_latent + 4 * layers * batch * latent * 4
    print(f"{name}: logits {max(x['logits'] for x in results):.1e}, latent cache per rank "
          f"{r['cache_bytes']} B (TP: {tp_latent} B; megatron's static cache at TP=1: "
          f"{r['tp1_cache_bytes']} B)")


def test_mla_decode_bytes_do_not_grow_with_the_context(pool4):
    """The collectives of a decode step (every layer, the logits too) send the same bytes
    after a prompt of 512 and of 4096 tokens (the grid alone: the TP=1 reference's s x s
    scores would not fit 4 ranks), while the latent cache grows 8x."""
    short = pool4.run(decode_matches_tp1, n=2, m=2, prompt=512, steps=5, reference=False)
    long = pool4.run(decode_matches_tp1, n=2, m=2, prompt=4096, steps=5, reference=False)
    for a, b in zip(short, long):
        assert a["comm"]["bytes"] == b["comm"]["bytes"] > 0, (a["comm"], b["comm"])
        assert a["comm"]["calls"] == b["comm"]["calls"]
        assert b["cache_bytes"] == 2 * -(-4101 // 4) * 2 * 40 * 4  # layers, rows, batch, L+r
        assert a["cache_bytes"] == 2 * -(-517 // 4) * 2 * 40 * 4
    print(f"decode step: {short[0]['comm']['bytes'] / 3:.0f} B sent per rank, "
          f"{short[0]['comm']['calls'] / 3:.0f} collectives, at prompts 512 and 4096")


# ------------------------------------------------- the entry points' MLA (model_config.py)
def _entry_args(m: int, **extra):
    return types.SimpleNamespace(**{
        "multi_latent_attention": True, "mxn_dim_slices": m, "position_embedding_type": "rope",
        "attention_backend": "AttnBackend.auto", "transformer_impl": "local", **extra})


@pytest.mark.parametrize("name,value,message", [
    ("mla_down_proj_fusion", True, "mla_down_proj_fusion=True is not supported by the grid "
                                   "attention: FusedMLASelfAttention"),
    ("recompute_modules", ["mla_up_proj"], "recompute_modules=['mla_up_proj'] is not supported"),
    ("window_size", (4, 0), "window_size=(4, 0) is not supported by the grid attention: "
                            "sliding-window MLA"),
])
def test_entry_points_refuse_what_the_grids_mla_does_not_compute(name, value, message):
    """The entry points' check (model_config.check_grid_options, called while the model config
    is built, before any collective) refuses MLA options on the grid, and leaves megatron's own
    MLA at plain TP alone."""
    from megatron_mxn.megatron_lm.model_config import check_grid_options

    config = make_config(MlaModel(), tp=4, m=2)
    check_grid_options(_entry_args(2), config)  # (the plain grid MLA config passes)
    setattr(config, name, value)
    with pytest.raises(MxnConfigError, match="^" + re.escape(message)):
        check_grid_options(_entry_args(2), config)
    tp = make_config(MlaModel(), tp=4)
    setattr(tp, name, value)
    check_grid_options(_entry_args(1), tp)


def test_entry_points_refuse_mla_with_megatrons_local_core_at_plain_tp():
    from megatron_mxn.megatron_lm.model_config import check_grid_options

    with pytest.raises(MxnConfigError, match="megatron-core's local DotProductAttention cannot "
                                             "build MLA"):
        check_grid_options(_entry_args(1, attention_backend="AttnBackend.local"),
                           make_config(MlaModel(), tp=4))
    check_grid_options(_entry_args(1, mxn_tp_core="fused"), make_config(MlaModel(), tp=4))


def test_fused_tp_core_computes_the_reference_mla_core():
    """--mxn-tp-core fused for MLA (the like-kernel TP baseline): the fused kernels give the
    reference core's output for a causal prefill, a decode row after a cache (lower-right
    causal), a chunk at an offset and a padding mask; the fused spec swaps every MLA core."""
    from megatron_mxn.attention.fused_core import FusedMlaDotProductAttention
    from megatron_mxn.attention.spec import get_fused_tp_layer_spec

    config = make_config(MlaModel(), tp=1)
    tp1 = types.SimpleNamespace(tp=types.SimpleNamespace(size=lambda: 1))
    cores = [cls(config, 1, AttnMaskType.causal, "self", softmax_scale=0.3, k_channels=24,
                 v_channels=12, pg_collection=tp1)
             for cls in (MlaDotProductAttention, FusedMlaDotProductAttention)]
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(9, 2, 8, 24, generator=g), torch.randn(9, 2, 8, 12, generator=g)
    padded = torch.ones(9, 9, dtype=torch.bool).triu(1).expand(2, 1, 9, 9).clone()
    padded[1, :, :, 6:] = True
    for sq, mask in ((9, None), (1, None), (4, None), (9, padded)):
        q = torch.randn(sq, 2, 8, 24, generator=g)
        ref, fused = (c(q, k, v, mask) for c in cores)
        assert fused.shape == ref.shape == (sq, 2, 8 * 12)
        assert (fused - ref).abs().max() < 1e-5 * ref.abs().max(), sq
    spec = get_fused_tp_layer_spec(with_mla_core(get_gpt_layer_local_spec(
        multi_latent_attention=True, qk_layernorm=True)))
    assert spec.submodules.self_attention.submodules.core_attention is \
        FusedMlaDotProductAttention


def test_with_mla_core_fills_every_layer_of_a_block_spec():
    """megatron's decoder block spec (MoE: a dense layer, then MoE layers, sharing layer spec
    objects) gets the reference core in every MLA layer; only_local keeps a core other than
    megatron's local DotProductAttention (Transformer Engine's)."""
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    dense = get_gpt_layer_local_spec(multi_latent_attention=True, qk_layernorm=True)
    moe = get_gpt_layer_local_spec(multi_latent_attention=True, qk_layernorm=True,
                                   num_experts=4)
    assert moe.submodules.mlp is not dense.submodules.mlp
    other = get_gpt_layer_local_spec(multi_latent_attention=True)
    other.submodules.self_attention.submodules.core_attention = torch.nn.Identity
    block = TransformerBlockSubmodules(layer_specs=[dense, moe, moe, other])
    got = with_mla_core(block, only_local=True)
    cores = [layer.submodules.self_attention.submodules.core_attention
             for layer in got.layer_specs]
    assert cores == [MlaDotProductAttention] * 3 + [torch.nn.Identity]
    assert dense.submodules.self_attention.submodules.core_attention is not \
        MlaDotProductAttention  # (a copy)
    with pytest.raises(MxnConfigError, match="needs an MLA layer spec"):
        with_mla_core(get_gpt_layer_local_spec())
