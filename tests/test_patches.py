"""The Megatron-LM checkout patch (patches/), the CPU runner for Megatron scripts, and the patch
registry (megatron_mxn.patching): fingerprints of the non-CPU patches, and nothing installed when
the package is imported."""

import os
import shutil
import subprocess

import pytest

from tests.launch import REPO, TINY_GPT, torchrun

APPLY = REPO / "patches" / "apply_megatron_lm.sh"


def test_apply_refuses_a_directory_that_is_not_a_checkout(tmp_path):
    proc = subprocess.run([str(APPLY), str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 1
    assert "is not a Megatron-LM checkout" in proc.stderr


def test_patch_is_the_minimal_change():
    patch = (REPO / "patches" / "megatron_lm_core_r0.19.0_pretrain_gpt.patch").read_text()
    added = [l for l in patch.splitlines() if l.startswith("+") and not l.startswith("+++")]
    removed = [l for l in patch.splitlines() if l.startswith("-") and not l.startswith("---")]
    assert len(removed) == 3 and len(added) <= 8
    assert any("with_mxn_args(" in l for l in added)


@pytest.mark.launches
@pytest.mark.skipif(not os.environ.get("MEGATRON_LM"), reason=(
    "needs a Megatron-LM core_r0.19.0 checkout in $MEGATRON_LM (GitHub is not reachable from "
    "CI) and pybind11 for its dataset helpers"))
def test_patched_checkout_trains_with_the_grid_on_cpu(tmp_path):
    checkout = tmp_path / "Megatron-LM"
    shutil.copytree(os.environ["MEGATRON_LM"], checkout, ignore=shutil.ignore_patterns(".git"))
    subprocess.run([str(APPLY), str(checkout)], check=True)
    env_path = f"{checkout}{os.pathsep}{REPO}"
    run = torchrun("-m megatron_mxn.cpu", 4, [
        str(checkout / "pretrain_gpt.py"), *TINY_GPT, "--mock-data", "--train-iters", "3",
        "--mxn-head-groups", "2", "--mxn-dim-slices", "2"], tmp_path / "run",
        pythonpath=env_path)
    assert run.returncode == 0, run.output[-3000:]
    assert "> mxn grid: 2 head groups x 2 dim slices" in run.rank_logs[0]
    assert sorted(run.by_iteration("lm loss")) == [1, 2, 3]


# --------------------------------------------------------------------------- the patch registry
# megatron_mxn.patching lists every runtime patch and every piece of megatron-core code the grid
# copies or overrides. The CPU-mode patches are checked in test_cpu_mode.py; the others here.

def _registry():
    """Every registered patch: each module registers its own when imported."""
    import importlib
    import pkgutil

    import megatron_mxn
    from megatron_mxn import patching

    for info in pkgutil.walk_packages(megatron_mxn.__path__, "megatron_mxn."):
        importlib.import_module(info.name)
    return patching.PATCHES


def _grid_patches():
    from megatron_mxn.cpu import SCOPES as CPU_SCOPES

    return [p for p in _registry() if p.scope not in CPU_SCOPES]


@pytest.mark.parametrize("patch", _grid_patches(), ids=lambda p: f"{p.scope}:{p.target}")
def test_grid_patch_target_is_unchanged(patch):
    """The engine guards and the model check (grid), the argument-parsing hook (parser), the
    training-log hooks and the megatron-core code MxnSelfAttention copies or overrides."""
    from megatron_mxn.patching import resolve, source_fingerprint

    try:
        target = resolve(patch.target)
    except (ImportError, AttributeError) as err:
        pytest.fail(f"patch target {patch.target} is gone ({err}); the patch was written for "
                    f"{patch.versions}")
    assert patch.fingerprint, f"{patch.target}: megatron targets carry a source fingerprint"
    assert source_fingerprint(target) == patch.fingerprint, (
        f"{patch.target} changed since megatron_mxn's {patch.scope} patch was written for "
        f"{patch.versions}: review it ({patch.reason}) and update its fingerprint")


def test_registry_is_consistent():
    from megatron_mxn.patching import SCOPES

    patches = _registry()
    assert {p.scope for p in patches} == set(SCOPES)
    keys = [(p.target, p.scope) for p in patches]
    assert len(keys) == len(set(keys)), "a target is registered twice in one scope"
    for p in patches:
        assert p.versions and len(p.reason) > 20, p.target
        assert (p.install is None) == (p.scope == "override"), p.target


IMPORT_EVERYTHING = r'''
import argparse, importlib, json, logging, os, pkgutil, sys
import torch
import megatron.core.jit
import megatron.training.training

def state():
    return {
        "module registration hooks": [getattr(h, "__qualname__", repr(h)) for h in
            torch.nn.modules.module._global_module_registration_hooks.values()],
        "import hooks": [repr(f) for f in sys.meta_path],
        "torch.compile": repr(torch.compile),
        "torch function modes": torch._C._len_torch_function_stack(),
        "ArgumentParser.parse_known_args": repr(argparse.ArgumentParser.parse_known_args),
        "megatron jit_fuser": repr(megatron.core.jit.jit_fuser),
        "RNG log filters": len(logging.getLogger("megatron.core.tensor_parallel.random").filters),
    }

def ours(obj):
    obj = getattr(obj, "__func__", obj)
    code = getattr(obj, "__code__", None)
    if code is not None:
        return os.sep + "megatron_mxn" + os.sep in code.co_filename
    return (getattr(obj, "__module__", None) or "").startswith("megatron_mxn")

before = state()
import megatron_mxn
for info in pkgutil.walk_packages(megatron_mxn.__path__, "megatron_mxn."):
    importlib.import_module(info.name)
from megatron_mxn import patching
after_import = state()
replaced = sorted(p.target for p in patching.PATCHES if ours(patching.resolve(p.target)))
import megatron_mxn.cpu
from megatron_mxn.attention import hooks
megatron_mxn.cpu.enable(training=True)
hooks.install()
after_install = state()
installed = sorted(p.target for p in patching.PATCHES if ours(patching.resolve(p.target)))
print("RESULT " + json.dumps({"before": before, "after_import": after_import,
                              "after_install": after_install, "replaced": replaced,
                              "installed": installed, "patches": len(patching.PATCHES)}))
'''


@pytest.mark.launches
def test_importing_every_module_installs_nothing():
    """Importing all of megatron_mxn (in a fresh interpreter) leaves megatron-core, megatron.
    training and torch as they were: every patch target is still the original, no global hook
    is added. The install calls then do change them (the check sees a patch)."""
    import json
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", IMPORT_EVERYTHING], capture_output=True,
                          text=True, cwd=REPO, timeout=600,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    r = json.loads(lines[-1][len("RESULT "):])
    assert r["after_import"] == r["before"]
    assert r["replaced"] == []
    # ... until the install calls
    changed = {k for k in r["before"] if r["after_install"][k] != r["before"][k]}
    assert changed >= {"module registration hooks", "import hooks", "torch function modes",
                       "megatron jit_fuser", "RNG log filters"}, changed
    assert "_check_rotary_of_model" in r["after_install"]["module registration hooks"]
    for target in ("megatron.core.inference.engines.static_engine.StaticInferenceEngine."
                   "__init__", "torch.cuda.current_device",
                   "megatron.training.arguments.validate_args",
                   "megatron.core.datasets.utils.compile_helpers"):
        assert target in r["installed"], target
