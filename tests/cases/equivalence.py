"""Grid model vs megatron-core's own TP=1 model: same weights, same logits and gradients."""

from __future__ import annotations

import torch
from megatron.core import parallel_state

import megatron_mxn
from tests.cases.common import (
    ModelSpec,
    batch,
    build_model,
    full_layout,
    load,
    make_config,
    max_rel_err,
    save,
    seed_all,
    train_step,
    wrap_ddp,
)


def reference(spec: ModelSpec, ckpt_dir: str):
    """megatron-core's stock GPT at TP=1 (every rank a DP replica): saves its weights to
    `ckpt_dir` and returns its logits, loss and full-layout gradients."""
    parallel_state.initialize_model_parallel(1, 1, create_gloo_process_groups=False)
    from megatron.core.process_groups_config import ProcessGroupCollection

    pgs = ProcessGroupCollection.use_mpu_process_groups()
    seed_all()
    config = make_config(spec, tp=1)
    model = build_model(spec, config, pgs, grid=False)
    ddp = wrap_ddp(model, config, pgs)
    save(model, ckpt_dir)
    record = train_step(ddp, config, batch(spec), pgs)
    grads = full_layout(model, lambda p: p.main_grad)
    parallel_state.destroy_model_parallel()
    return record, grads


def grid_run(spec: ModelSpec, ckpt_dir: str, n: int, m: int, pp: int = 1, sp: bool = False):
    pgs = megatron_mxn.initialize_mxn_parallel(
        n, m, pipeline_model_parallel_size=pp, create_gloo_process_groups=False)
    seed_all(99)  # different init: the weights must come from the checkpoint
    config = make_config(spec, tp=n * m, pp=pp, m=m, sp=sp)
    model = build_model(spec, config, pgs, grid=True)
    load(model, ckpt_dir)
    ddp = wrap_ddp(model, config, pgs)
    record = train_step(ddp, config, batch(spec), pgs)
    grads = full_layout(model, lambda p: p.main_grad)
    return record, grads


def compare_with_tp1(ckpt_dir: str, n: int, m: int, pp: int = 1, sp: bool = False,
                     **model_kwargs):
    """Returns the max relative errors (logits, loss, worst gradient) of grid vs TP=1."""
    spec = ModelSpec(**model_kwargs)
    ref, ref_grads = reference(spec, ckpt_dir)
    got, grads = grid_run(spec, ckpt_dir, n, m, pp, sp)
    result = {"grad_keys": sorted(grads)}
    assert sorted(grads) == sorted(ref_grads), (sorted(grads), sorted(ref_grads))
    result["grad"] = {k: max_rel_err(grads[k], ref_grads[k]) for k in grads}
    if "logits" in got:
        result["logits"] = max_rel_err(got["logits"], ref["logits"])
        result["loss"] = max_rel_err(got["loss"], ref["loss"])
    return result
