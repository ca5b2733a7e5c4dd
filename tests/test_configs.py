"""configs/*.yaml expand into flags that Megatron's parser and megatron_mxn.inference.generate know."""

from pathlib import Path

import pytest

from megatron_mxn.megatron_lm.run_configs import expand_config_args, load_config, megatron_option_strings
from megatron_mxn.grid.layout import MxnConfigError
from megatron_mxn.megatron_lm import add_mxn_args

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))


@pytest.fixture(scope="module")
def known():
    from megatron_mxn.inference.generate_flags import GENERATE

    megatron = megatron_option_strings(add_mxn_args)
    return {"training": megatron,
            "inference": megatron | {o for a in GENERATE._actions for o in a.option_strings}}


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_layout_expands_for_pretrain_and_generate(path, known):
    cfg = load_config(path)
    assert {"baseline", "grid", "tp"} <= set(cfg["layouts"])
    for layout in cfg["layouts"]:
        for section in ("training", "inference"):
            argv = expand_config_args(["--config", str(path), "--layout", layout, "--lr", "1"],
                                      known[section], section)
            assert argv[-2:] == ["--lr", "1"]  # explicit flags come last, so they win
            # (the planner's full-size models)
            layers = {"llama70b_gqa": "80", "deepseek_v3": "61", "kimi_k2": "61"}.get(path.stem,
                                                                                    "4")
            assert "--num-layers" in argv and argv[argv.index("--num-layers") + 1] == layers


def test_layout_flags_are_what_the_config_says():
    argv = expand_config_args(["--config", str(CONFIGS[0].parent / "paper_dense.yaml"),
                               "--layout", "grid"], None, "inference")
    assert argv[argv.index("--mxn-head-groups") + 1] == "4"
    assert argv[argv.index("--mxn-dim-slices") + 1] == "4"
    assert argv[argv.index("--batch-size") + 1] == "1024"
    assert "--fp16" in argv


def test_unknown_key_names_the_closest_flag(tmp_path, known):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  num-layer: 4\nlayouts:\n  a: {}\n")
    with pytest.raises(MxnConfigError, match=r"unknown config key 'num-layer' in .*bad.yaml "
                                             r"\(model\); did you mean 'num-layers'"):
        expand_config_args(["--config", str(bad)], known["training"])
    bad.write_text("modle:\n  num-layers: 4\n")
    with pytest.raises(MxnConfigError, match=r"unknown config section\(s\) \['modle'\]"):
        expand_config_args(["--config", str(bad)], known["training"])


def test_unknown_layout_lists_the_layouts():
    with pytest.raises(MxnConfigError, match=r"no layout 'grid4' \(layouts: \['baseline', "
                                             r"'grid', 'tp', 'tp_fused'\]\)"):
        expand_config_args(["--config", str(CONFIGS[0]), "--layout", "grid4"])


def test_cpu_long_grid_layouts_pass_their_kv_cache_to_generate_only(known):
    from megatron_mxn.inference.generate_flags import split_argv

    path = str(CONFIGS[0].parent / "cpu_long.yaml")
    for layout, cache in (("grid", "positions"), ("grid_dims", "dims"), ("tp", "auto")):
        gen, megatron_argv = split_argv(["--config", path, "--layout", layout, "--load", "x"])
        assert gen.mxn_kv_cache == cache and "--mxn-kv-cache" not in megatron_argv
        assert (gen.batch_size, gen.prompt_length) == (2, 4096)
        train = expand_config_args(["--config", path, "--layout", layout], known["training"])
        assert "--mxn-kv-cache" not in train  # (a generation flag: not for pretraining)


def test_ab_driver_validates_the_prompt_length_sweep(capsys):
    from megatron_mxn.tools import ab_compare

    cfg = ["--config", str(CONFIGS[0].parent / "cpu_long.yaml")]
    assert ab_compare.parse_args(cfg + ["--prompt-lengths", "512,4096"]).prompt_lengths == [
        512, 4096]
    for bad, why in (("512,4k", "not a comma-separated list of whole numbers"),
                     ("0,512", "must be >= 1"), ("4096,512", "distinct lengths in ascending")):
        with pytest.raises(SystemExit):
            ab_compare.parse_args(cfg + ["--prompt-lengths", bad])
        assert why in capsys.readouterr().err
    with pytest.raises(SystemExit):
        ab_compare.parse_args(cfg + ["--prompt-lengths", "512", "--prompt-length", "64"])
    assert "--prompt-lengths sets the prompts" in capsys.readouterr().err
    long_cfg = load_config(cfg[1])
    with pytest.raises(SystemExit, match=r"prompt length\(s\) \[8441\] \+ 8 new tokens exceed "
                                         r"max-position-embeddings \(8448\)"):
        ab_compare.check_lengths(long_cfg, cfg[1], [512, 8441], [])
    # megatron-core's prefill: 3 x [micro-batch, heads / TP, s, s] fp32; the grid's is O(s)
    assert ab_compare.prefill_score_bytes(long_cfg, "tp", 2, 8192) == 3 * 2 * 2 * 8192**2 * 4
    assert ab_compare.prefill_score_bytes(long_cfg, "baseline", 2, 8192, 1024) == \
        3 * 1 * 4 * 1024 * 8192 * 4
    assert ab_compare.prefill_score_bytes(long_cfg, "grid", 2, 8192) == 0


def test_help_of_megatrons_parser_with_the_grid_flags_formats():
    """`--help` of every entry point: megatron-core 0.19.2 has a help string with a bare '%'
    that makes argparse raise; add_mxn_args escapes it (and the grid flags show)."""
    import argparse

    from megatron.training.arguments import add_megatron_arguments

    from megatron_mxn.megatron_lm import add_mxn_args

    text = add_mxn_args(add_megatron_arguments(argparse.ArgumentParser())).format_help()
    assert "--mxn-head-groups" in text and "(e.g. 1.10 = 10%)" in text
