"""YAML model/run configs (`configs/`) expanded into Megatron command-line flags.

A config has sections. `model` holds the Megatron flags of the model (`num-layers: 4`,
`fp16: true`), `training` those of a pretraining run, `inference` those of a generation run
(megatron_mxn.inference.generate's flags); `layouts` maps a layout name to its flags
(`grid: {mxn-head-groups: 4, mxn-dim-slices: 4}`; a layout may also hold generation flags such
as `mxn-kv-cache: positions`, which only generation gets); `cluster` describes the machines (used by
the planner and the SLURM launchers); `notes` is free text. `--config FILE [--layout NAME]` on
a command line is replaced by the flags of `model`, the entry point's own section and the
layout, placed first so that explicit flags win.
"""

from __future__ import annotations

import difflib
from typing import Dict, Iterable, List, Optional

import yaml

from megatron_mxn.grid.layout import MxnConfigError
from megatron_mxn.megatron_lm.flags import GENERATE

SECTIONS = ("model", "training", "inference", "layouts", "cluster", "notes")
FLAG_SECTIONS = ("model", "training", "inference")


def load_config(path: str) -> dict:
    """Read a config and check its sections (not yet its flags)."""
    with open(path) as f:
        cfg = yaml.safe_load(f) or {}
    if not isinstance(cfg, dict):
        raise MxnConfigError(f"{path}: a config is a mapping of sections {SECTIONS}")
    unknown = sorted(set(cfg) - set(SECTIONS))
    if unknown:
        raise MxnConfigError(f"{path}: unknown config section(s) {unknown}; sections are "
                             f"{list(SECTIONS)}")
    for section in FLAG_SECTIONS + ("cluster",):
        if not isinstance(cfg.get(section, {}), dict):
            raise MxnConfigError(f"{path}: section '{section}' must be a mapping")
    return cfg


def flag_keys(section: Optional[Dict[str, object]]) -> Dict[str, object]:
    """A config section with its keys spelled as Megatron flags (num_layers -> num-layers)."""
    return {str(k).replace("_", "-"): v for k, v in (section or {}).items()}


def flags_of(mapping: Dict[str, object]) -> List[str]:
    """{'num-layers': 4, 'fp16': True, 'bf16': False} -> ['--num-layers', '4', '--fp16']."""
    argv: List[str] = []
    for key, value in mapping.items():
        flag = "--" + str(key).replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value is False or value is None:
            continue
        elif isinstance(value, (list, tuple)):
            argv += [flag, *map(str, value)]
        else:
            argv += [flag, str(value)]
    return argv


def config_flags(cfg: dict, layout: Optional[str], path: str = "config",
                 known: Optional[Iterable[str]] = None,
                 sections: Iterable[str] = ("model",)) -> List[str]:
    """The flags of `sections` plus one layout's, checked against `known` option strings when
    given (an unknown key is an error naming the closest flag)."""
    layouts = cfg.get("layouts") or {}
    if layout is not None and layout not in layouts:
        raise MxnConfigError(f"{path}: no layout '{layout}' (layouts: {sorted(layouts)})")
    parts = [(section, cfg.get(section) or {}) for section in sections]
    if layout is not None:
        mapping = layouts[layout] or {}
        if "inference" not in sections:  # (its generation flags are not for pretraining)
            generation = generation_option_strings()
            mapping = {k: v for k, v in mapping.items()
                       if "--" + str(k).replace("_", "-") not in generation}
        parts.append((f"layouts.{layout}", mapping))
    argv: List[str] = []
    for where, mapping in parts:
        flags = flags_of(mapping)
        if known is not None:
            check_keys(mapping, known, f"{path} ({where})")
        argv += flags
    return argv


def generation_option_strings() -> set:
    """The option strings of megatron_mxn.inference.generate's own (non-Megatron) flags."""
    return {option for action in GENERATE._actions for option in action.option_strings}


def check_keys(mapping: Dict[str, object], known: Iterable[str], where: str) -> None:
    known = set(known)
    for key in mapping:
        flag = "--" + str(key).replace("_", "-")
        if flag not in known:
            close = difflib.get_close_matches(flag, sorted(known), n=1)
            hint = f"; did you mean '{close[0][2:]}'?" if close else ""
            raise MxnConfigError(f"unknown config key '{key}' in {where}{hint}")


def expand_config_args(argv: List[str], known: Optional[Iterable[str]] = None,
                       section: str = "training") -> List[str]:
    """Replace `--config FILE` (and `--layout NAME`) in argv by the flags of the config's
    `model` and `section` sections and of the layout, first; then put the model and tokenizer
    flags of `--hf-dir DIR` (given or from the config) before all of them."""
    return expand_hf_dir(_expand_config(argv, known, section), generation=section == "inference")


def _expand_config(argv: List[str], known: Optional[Iterable[str]], section: str) -> List[str]:
    if "--config" not in argv:
        if "--layout" in argv:
            raise MxnConfigError("--layout needs --config")
        return argv
    rest, path, layout = list(argv), None, None
    for name in ("--config", "--layout"):
        if name in rest:
            k = rest.index(name)
            if k + 1 >= len(rest):
                raise MxnConfigError(f"{name} needs a value")
            value = rest[k + 1]
            del rest[k:k + 2]
            path, layout = (value, layout) if name == "--config" else (path, value)
    return config_flags(load_config(path), layout, path, known, ("model", section)) + rest


def expand_hf_dir(argv: List[str], generation: bool) -> List[str]:
    """`--hf-dir DIR` stays (the entry points check --load against it) and brings the flags of
    DIR's model and tokenizer (megatron_mxn.convert.hf_run), first: explicit flags win."""
    if "--hf-dir" not in argv:
        return argv
    k = argv.index("--hf-dir")
    if k + 1 >= len(argv) or argv[k + 1].startswith("--"):
        raise MxnConfigError("--hf-dir needs a value")
    from megatron_mxn.convert.hf_run import hf_dir_flags

    return hf_dir_flags(argv[k + 1], generation) + argv


def megatron_option_strings(*extra_providers) -> set:
    """Every option string Megatron's parser knows, plus those added by `extra_providers`."""
    import argparse

    from megatron.training.arguments import add_megatron_arguments

    parser = add_megatron_arguments(argparse.ArgumentParser(add_help=False))
    for provider in extra_providers:
        parser = provider(parser)
    return {option for action in parser._actions for option in action.option_strings}
