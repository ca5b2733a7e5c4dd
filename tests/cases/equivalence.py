"""Grid model vs megatron-core's own TP=1 model: same weights, same logits and gradients."""

from __future__ import annotations

import dataclasses

import torch

import megatron_mxn
from tests.cases.common import (
    ModelSpec,
    batch,
    build_model,
    full_layout,
    load,
    make_config,
    l2_rel_err,
    max_rel_err,
    save,
    seed_all,
    train_step,
    wrap_ddp,
)


def run_tp1(spec: ModelSpec, ckpt_dir: str, save_weights: bool):
    """megatron-core's stock GPT at TP=1 (every rank a DP replica). Either creates the weights
    (rounded to bf16 values, so that the fp32 and bf16 runs share them exactly) and saves them
    to `ckpt_dir`, or loads them from there. Returns logits, loss and full-layout gradients."""
    pgs = megatron_mxn.initialize_mxn_parallel(1, 1, create_gloo_process_groups=False)
    seed_all()
    config = make_config(spec, tp=1)
    model = build_model(spec, config, pgs, grid=False)
    if save_weights:
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.to(torch.bfloat16))
        save(model, ckpt_dir)
    else:
        load(model, ckpt_dir)
    record = train_step(wrap_ddp(model, config, pgs), config, batch(spec), pgs)
    grads = full_layout(model, lambda p: p.main_grad)
    megatron_mxn.destroy_mxn_parallel(destroy_model_parallel=True)
    return record, grads


def grid_run(spec: ModelSpec, ckpt_dir: str, n: int, m: int, pp: int = 1, sp: bool = False,
             schedule: str = "exact"):
    pgs = megatron_mxn.initialize_mxn_parallel(
        n, m, pipeline_model_parallel_size=pp, create_gloo_process_groups=False)
    seed_all(99)  # different init: the weights must come from the checkpoint
    config = make_config(spec, tp=n * m, pp=pp, m=m, sp=sp, mxn_attention=schedule)
    model = build_model(spec, config, pgs, grid=True)
    load(model, ckpt_dir)
    ddp = wrap_ddp(model, config, pgs)
    record = train_step(ddp, config, batch(spec), pgs)
    grads = full_layout(model, lambda p: p.main_grad)
    megatron_mxn.destroy_mxn_parallel(destroy_model_parallel=True)
    return record, grads


def _errors(got, grads, ref, ref_grads, err) -> dict:
    assert sorted(grads) == sorted(ref_grads), (sorted(grads), sorted(ref_grads))
    out = {"grad": {k: err(grads[k], ref_grads[k]) for k in grads}, "grad_keys": sorted(grads)}
    if "logits" in got:
        out["logits"] = err(got["logits"], ref["logits"])
        out["loss"] = err(got["loss"], ref["loss"])
    return out


def compare_with_tp1(ckpt_dir: str, n: int, m: int, pp: int = 1, sp: bool = False,
                     schedule: str = "exact", **model_kwargs):
    """Errors of the grid against megatron-core's TP=1 model with the same weights.

    fp32: worst-element relative error of the logits, the loss and every gradient.
    bf16: both the grid and TP=1 run in bf16 and are measured against the fp32 TP=1 run
    (whole-tensor relative error, see l2_rel_err); returns both, so a test can require the
    grid to be within tolerance and no less accurate than megatron's own bf16 model.
    """
    spec = ModelSpec(**model_kwargs)
    truth = run_tp1(dataclasses.replace(spec, dtype="fp32"), ckpt_dir, save_weights=True)
    got = grid_run(spec, ckpt_dir, n, m, pp, sp, schedule)
    if spec.dtype == "fp32":
        return _errors(*got, *truth, max_rel_err)
    result = _errors(*got, *truth, l2_rel_err)
    result["tp1"] = _errors(*run_tp1(spec, ckpt_dir, save_weights=False), *truth, l2_rel_err)
    return result
