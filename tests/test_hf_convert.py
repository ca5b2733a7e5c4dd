"""Hugging Face checkpoints to Megatron checkpoints and back (megatron_mxn.convert), verified
against transformers: bit-identical round trips, logits of megatron's TP=1 model and of the grid
(2x2, 1x4, loaded with megatron.training's load_checkpoint) against transformers' forward, and
every refusal. Tiny local models of each family (tests/cases/hf.py); nothing is downloaded."""

import copy

import pytest
import torch

pytest.importorskip("transformers")

from megatron_mxn.convert.hf_config import ConversionError, megatron_flags  # noqa: E402
from tests.cases import hf  # noqa: E402
from tests.conftest import get_pool  # noqa: E402

TOLERANCE = 1e-4  # max |megatron - transformers| / max |transformers| of the fp32 logits


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """family -> (HF directory, its config dict, transformers' logits of hf.tokens(),
    transformers' greedy tokens of hf.PROMPTS), written once per module."""
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for f in hf.FAMILIES:
        d = str(root / f)
        cfg = hf.make_hf_model(f, d)
        out[f] = (d, cfg, hf.hf_logits(d, hf.tokens()), hf.hf_greedy(d, hf.prompt_ids(d)))
    return out


@pytest.fixture(scope="module")
def checkpoints(models, tmp_path_factory):
    """family -> Megatron checkpoint converted from its HF directory (one rank)."""
    root = tmp_path_factory.mktemp("megatron")
    pool = get_pool(1)
    return {f: (str(root / f), pool.run(hf.convert_only, hf_dir=d, ckpt=str(root / f))[0])
            for f, (d, *_) in models.items()}


def greedy_kwargs(hf_dir: str, cfg: dict) -> dict:
    return {"prompts": hf.prompt_ids(hf_dir), "eos": cfg["eos_token_id"]}


@pytest.mark.uses_pool
@pytest.mark.parametrize("family", list(hf.FAMILIES))
def test_round_trip_is_bit_identical_and_tp1_matches_transformers(models, checkpoints,
                                                                  tmp_path, family):
    """Round trip bit for bit; megatron-core's TP=1 model: logits and greedy tokens."""
    hf_dir, cfg, expected, greedy = models[family]
    ckpt, flags = checkpoints[family]
    [r] = get_pool(1).run(hf.back_and_logits, hf_dir=hf_dir, ckpt=ckpt,
                          out_dir=str(tmp_path / "out"), expected=expected,
                          **greedy_kwargs(hf_dir, cfg))
    assert r["same_keys"] and r["different"] == [], r["different"]
    assert {"config.json", "tokenizer.json", "tokenizer_config.json"} <= set(r["side_files"])
    print(f"{family}: TP=1 logits vs transformers {r['logits_err']:.2e}, greedy {greedy}")
    assert r["logits_err"] <= TOLERANCE
    assert r["tokens"] == greedy
    assert flags == megatron_flags(cfg)


def check_grid(results, greedy, m: int, what: str) -> None:
    """Every rank's logits within TOLERANCE; the last stage's greedy tokens with both KV
    caches (dims only at m = 1) equal to transformers'."""
    err = max(r["logits_err"] for r in results)
    print(f"{what}: logits vs transformers {err:.2e}")
    assert err <= TOLERANCE
    caches = results[0]["tokens"]
    assert sorted(caches) == (["dims", "positions"] if m > 1 else ["dims"])
    for cache, got in caches.items():
        assert got == greedy, (what, cache)


@pytest.mark.parametrize("n,m", [(2, 2), (1, 4)])
@pytest.mark.parametrize("family", list(hf.FAMILIES))
def test_grid_loads_the_converted_checkpoint_and_matches_transformers(pool4, models,
                                                                    checkpoints, tmp_path,
                                                                    family, n, m):
    hf_dir, cfg, expected, greedy = models[family]
    save = str(tmp_path / "grid") if (family, n) == ("mixtral", 2) else ""
    results = pool4.run(hf.grid_logits_vs_hf, hf_dir=hf_dir, ckpt=checkpoints[family][0], n=n,
                        m=m, expected=expected, save=save, **greedy_kwargs(hf_dir, cfg))
    check_grid(results, greedy, m, f"{family} grid {n}x{m}")
    if save:  # out again: the grid's own checkpoint (TP=4) back to HF, bit-identical
        [r] = get_pool(1).run(hf.back_and_logits, hf_dir=hf_dir, ckpt=save,
                              out_dir=str(tmp_path / "out"), expected=expected)
        assert r["same_keys"] and r["different"] == [], r["different"]


def test_grid_2x4_on_8_ranks_matches_transformers(pool8, models, checkpoints):
    """Llama on 8 ranks: 2 head groups (one per KV head) x 4 dim slices."""
    hf_dir, cfg, expected, greedy = models["llama"]
    results = pool8.run(hf.grid_logits_vs_hf, hf_dir=hf_dir, ckpt=checkpoints["llama"][0], n=2,
                        m=4, expected=expected, **greedy_kwargs(hf_dir, cfg))
    check_grid(results, greedy, 4, "llama grid 2x4")


@pytest.mark.uses_pool
def test_bf16_round_trip_is_bit_identical(tmp_path):
    hf_dir = str(tmp_path / "hf")
    hf.make_hf_model("qwen3", hf_dir, dtype=torch.bfloat16)
    pool = get_pool(1)
    flags = pool.run(hf.convert_only, hf_dir=hf_dir, ckpt=str(tmp_path / "mg"))[0]
    truth = hf.hf_logits(hf_dir, hf.tokens())  # the bf16 weights, computed in fp32
    [r] = pool.run(hf.back_and_logits, hf_dir=hf_dir, ckpt=str(tmp_path / "mg"),
                   out_dir=str(tmp_path / "out"), expected=truth)
    assert "--bf16" in flags
    assert r["same_keys"] and r["different"] == [], r["different"]
    hf_bf16 = hf.rel_err(hf.hf_logits(hf_dir, hf.tokens(), dtype=torch.bfloat16), truth)
    print(f"qwen3 bf16 vs fp32 logits: megatron TP=1 {r['logits_err']:.2e}, "
          f"transformers {hf_bf16:.2e}")
    assert r["logits_err"] <= 2e-2


@pytest.mark.uses_pool
def test_tokenizer_loads_in_megatron_and_other_models_are_refused(models, checkpoints):
    r = get_pool(1).run(hf.tokenizer_and_mismatch, hf_dir=models["llama"][0],
                        other_dir=models["qwen3"][0], ckpt=checkpoints["llama"][0])[0]
    assert r["same_ids"] and r["vocab"] == hf.VOCAB
    assert "qk_layernorm: checkpoint False, HF config True" in r["mismatch"]


@pytest.mark.uses_pool
def test_command_line_converts_both_ways_and_prints_the_flags(models, tmp_path):
    hf_dir, cfg, *_ = models["mistral"]
    ckpt, out = tmp_path / "mg", tmp_path / "out"
    pool = get_pool(1)
    [to_mg] = pool.run(hf.command_line, argv=["hf-to-megatron", "--hf-dir", hf_dir,
                                              "--save", str(ckpt)])
    assert to_mg["status"] == 0, to_mg["stderr"]
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "release"
    assert "Megatron model flags: " + " ".join(megatron_flags(cfg)) in to_mg["stdout"]
    [to_hf] = pool.run(hf.command_line, argv=["megatron-to-hf", "--load", str(ckpt),
                                              "--hf-dir", hf_dir, "--save-hf", str(out)])
    assert to_hf["status"] == 0 and (out / "model.safetensors").exists(), to_hf["stderr"]
    [refused] = pool.run(hf.command_line, argv=["megatron-to-hf", "--load", str(ckpt),
                                                "--hf-dir", models["mixtral"][0],
                                                "--save-hf", str(tmp_path / "no")])
    assert refused["status"] == 2 and "num_experts: checkpoint None, HF config 4" in \
        refused["stderr"]


def test_printed_flags():
    flags = " ".join(megatron_flags(hf.hf_config("mixtral").to_dict()))
    for part in ("--num-layers 2", "--hidden-size 64", "--num-attention-heads 8",
                 "--num-query-groups 2", "--kv-channels 16", "--normalization RMSNorm",
                 "--swiglu", "--disable-bias-linear", "--position-embedding-type rope",
                 "--rotary-base 1000000", "--untie-embeddings-and-output-weights",
                 "--num-experts 4", "--moe-router-topk 2", "--moe-ffn-hidden-size 128",
                 "--padded-vocab-size 384"):
        assert part in flags
    assert "--window-size 4,0" in " ".join(megatron_flags(hf.hf_config("mistral").to_dict()))
    assert "--add-qkv-bias" in megatron_flags(hf.hf_config("qwen2").to_dict())
    assert "--qk-layernorm" in megatron_flags(hf.hf_config("qwen3").to_dict())
    assert "--untie-embeddings-and-output-weights" not in megatron_flags(
        hf.hf_config("qwen2").to_dict())


def _with(family, **changes):
    cfg = copy.deepcopy(hf.hf_config(family).to_dict())
    for key, value in changes.items():
        if key.startswith("rope."):
            cfg["rope_parameters"][key[5:]] = value
        else:
            cfg[key] = value
    return cfg


@pytest.mark.parametrize("cfg,field", [
    (_with("llama", attention_bias=True), "attention_bias"),
    (_with("llama", mlp_bias=True), "mlp_bias"),
    (_with("llama", hidden_act="gelu"), "hidden_act"),
    (_with("llama", **{"rope.factor": 32.0}), "rope_scaling.factor"),
    (_with("llama", **{"rope.original_max_position_embeddings": 4096}),
     "rope_scaling.original_max_position_embeddings"),
    (_with("qwen3", **{"rope.rope_type": "yarn"}), "rope_scaling.rope_type"),
    (_with("qwen3", **{"rope.rope_theta": 10000.5}), "rope_theta"),
    (_with("qwen2", use_sliding_window=True), "use_sliding_window"),
    (_with("mixtral", router_jitter_noise=0.1), "router_jitter_noise"),
    (_with("llama", model_type="gemma"), "model_type"),
    (_with("llama", dtype="float64"), "dtype"),
    (_with("llama", partial_rotary_factor=0.5), "partial_rotary_factor"),
])
def test_refusals_name_the_field(cfg, field):
    with pytest.raises(ConversionError, match=f"HF config field {field}="):
        megatron_flags(cfg)


def test_older_config_fields_map_like_rope_parameters():
    new = hf.hf_config("llama").to_dict()
    old = {k: v for k, v in new.items() if k != "rope_parameters"}
    rope = dict(new["rope_parameters"])
    old["rope_theta"] = rope.pop("rope_theta")
    old["rope_scaling"] = {**rope, "type": rope.pop("rope_type")}
    assert megatron_flags(old) == megatron_flags(new)
