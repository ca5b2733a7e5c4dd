"""RoPE and attention-scaling variants on the grid, exact against megatron-core's own TP=1 model.

Each variant trains one fp32 step of megatron's TP=1 GPT, hands the weights to the grid
(2x2 or 1x4, m > 1) and trains one step there under the schedules `auto` (which picks the
sequence-split core `seq` for training) and `exact`: logits, loss and every gradient must match
to 1e-5 (tests/cases/options.py). So that a variant that silently does nothing cannot pass, the
variant's TP=1 model must also differ, on the same weights and in the same measure, from the
plain model ("plain": what the variant is compared with) by at least 10x that tolerance; the
one variant that by design leaves the function unchanged (apply_query_key_layer_scaling) must
instead show its per-layer scales on the grid.

RoPE positions are 0..seq-1; at the default 16 tokens Llama-3 rope_scaling (which only slows
frequencies with wavelengths above 2048 positions) barely moves the model, so that variant runs
128 tokens. YaRN runs 32 tokens, past yarn_original_max_position_embeddings (16): its
frequencies are interpolated and its concentration factor (mscale) scales q and k; its plain
model is the same YaRN with a concentration factor of 1 (the 2x2 case: what the grid's
_yarn_concentration_factor adds) or megatron's plain RoPE (the 1x4 case).

layernorm_zero_centered_gamma: megatron's local-spec norms are torch norms, which refuse it
without apex / Transformer Engine (not installed here), so both models take the stand-in
tests/cases/common.ZeroCenteredNorm (apex FusedLayerNorm's weight + 1) for their norms; the
grid's own q/k norms (SlicedHeadNorm) are checked against it.
"""

import pytest

from tests.cases.options import variants_match_tp1

pytestmark = pytest.mark.uses_pool

TOL = 1e-5  # worst relative error of logits, loss and every gradient (fp32)
CHANGES = 10 * TOL  # how far each variant must move megatron's own model from its plain one
SCHEDULES = ["auto", "exact"]


def _yarn(factor, original, mscale, mscale_all_dim):
    """The YaRN attributes megatron.training sets on the config (all read by GPTModel)."""
    return {"yarn_rotary_scaling_factor": factor,
            "yarn_original_max_position_embeddings": original, "yarn_beta_fast": 32.0,
            "yarn_beta_slow": 1.0, "yarn_mscale": mscale, "yarn_mscale_all_dim": mscale_all_dim,
            "yarn_correction_range_round_to_int": True}


# apply_query_key_layer_scaling divides the softmax scale by the layer number and multiplies
# the scores back in the softmax: the same function, so it is checked through its scales.
SAME_FUNCTION = {"qk_layer_scaling", "qk_layer_scaling_softmax_scale"}


def _v(name, spec=None, config=None, model=None, plain=None):
    v = {"name": name, "spec": spec or {}, "config": config or {}, "model": model or {},
         "schedules": SCHEDULES}
    if name not in SAME_FUNCTION:
        v["plain"] = plain or {}  # default: the same spec without the config / model kwargs
    return v


CASES = {
    "rope_2x2": (2, 2, [
        _v("rotary_base_500000", model={"rotary_base": 500000}),
        _v("rope_scaling_llama3", spec={"seq": 128},
           model={"rope_scaling": True, "rope_scaling_factor": 8.0}),
        _v("seq_len_interpolation", model={"seq_len_interpolation_factor": 2.0}),
        # (megatron's YaRN rotates every head dim whatever rotary_percent says)
        _v("yarn_mscale", spec={"position": "yarn", "seq": 32, "rotary_percent": 0.5},
           config=_yarn(4.0, 16, 1.0, 0.0),
           plain={"config": _yarn(4.0, 16, 1.0, 1.0)}),  # concentration factor 1
        _v("no_rope_freq_2", config={"no_rope_freq": 2}),
    ]),
    "scaling_2x2": (2, 2, [
        _v("softmax_scale", config={"softmax_scale": 0.1}),
        _v("qk_l2_norm", config={"qk_l2_norm": True}),
        _v("zero_centered_gamma", config={"layernorm_zero_centered_gamma": True}),
        _v("zero_centered_gamma_qk_layernorm", spec={"qk_norm": "LayerNorm"},
           config={"layernorm_zero_centered_gamma": True}),
        _v("qk_layer_scaling", spec={"num_layers": 3},
           config={"apply_query_key_layer_scaling": True}),
    ]),
    "rope_1x4": (1, 4, [
        _v("rotary_base_1000", model={"rotary_base": 1000}),
        _v("yarn", spec={"position": "yarn", "seq": 32}, config=_yarn(8.0, 16, 1.0, 0.5),
           plain={"spec": {"position": "rope"}}),
        _v("no_rope_list", config={"no_rope_freq": [1, 0]}),
    ]),
    "scaling_1x4": (1, 4, [
        _v("use_mup", config={"use_mup": True, "mup_base_head_dim": 4.0}),
        _v("zero_centered_gamma_qk_rmsnorm", spec={"qk_norm": "RMSNorm"},
           config={"layernorm_zero_centered_gamma": True}),
        _v("qk_layer_scaling_softmax_scale", spec={"num_layers": 3},
           config={"apply_query_key_layer_scaling": True, "softmax_scale": 0.1}),
    ]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_rope_variant_matches_tp1(case, pool4):
    n, m, variants = CASES[case]
    results = pool4.run(variants_match_tp1, n=n, m=m, variants=variants)
    assert all(r == results[0] for r in results[1:]), "ranks disagree"
    rows = results[0]
    assert [(r["name"], r["schedule"]) for r in rows] == \
        [(v["name"], s) for v in variants for s in SCHEDULES]
    for r in rows:  # shown with -s
        print(f"{case} {r['name']:32s} {r['schedule']:5s} err {r['err']:.2e} ({r['worst']}), "
              f"vs plain {r['vs_plain_all']}")
    bad = [(r["name"], r["schedule"], r["worst"], r["err"]) for r in rows if not r["err"] < TOL]
    assert not bad, f"not exact on the {n}x{m} grid: {bad}"
    # auto trains with the sequence-split core; exact is the partial-score all-reduce
    assert all(r["chosen"] == (["seq"] if r["schedule"] == "auto" else []) for r in rows), \
        [(r["name"], r["schedule"], r["chosen"]) for r in rows]
    # every variant moves megatron's own model (so an ignored variant would fail above)
    weak = [(r["name"], r["vs_plain_all"]) for r in rows
            if r["name"] not in SAME_FUNCTION and not r["vs_plain_all"] > CHANGES]
    assert not weak, f"variants that barely change megatron's TP=1 model: {weak}"
    # the core attention of every layer, on the grid as in megatron's model, keeps the scales
    for r in rows:
        assert r["scales"] == r["ref_scales"], (r["name"], r["scales"], r["ref_scales"])
        v = next(v for v in variants if v["name"] == r["name"])
        base = v["config"].get("softmax_scale") or 16 ** -0.5
        if v["config"].get("use_mup"):
            base = 4.0 ** 0.5 / 16  # sqrt(mup_base_head_dim) / kv_channels
        layered = v["config"].get("apply_query_key_layer_scaling", False)
        want = [(base / layer if layered else base, layer if layered else None)
                for layer in range(1, len(r["scales"]) + 1)]
        assert [s for s, _ in r["scales"]] == pytest.approx([s for s, _ in want]) and \
            [k for _, k in r["scales"]] == [k for _, k in want], (r["name"], r["scales"], want)
