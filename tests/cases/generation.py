"""Batched greedy generation under grid/TP x PP layouts against megatron-core's TP=1 model."""

from __future__ import annotations

import torch

import megatron_mxn
from megatron_mxn.inference.generation import generate
from tests.cases.common import ModelSpec, build_model, load, make_config, max_rel_err, save, seed_all

BATCH, PROMPT = 4, 8


def _model(spec: ModelSpec, n: int, m: int, pp: int, grid: bool, seed: int):
    pgs = megatron_mxn.initialize_mxn_parallel(n, m, pipeline_model_parallel_size=pp,
                                               create_gloo_process_groups=False)
    seed_all(seed)
    config = make_config(spec, tp=n * m, pp=pp, m=m if grid else 1)
    return build_model(spec, config, pgs, grid=grid, max_seq=64).eval(), pgs


def generation_matches_tp1(ckpt_dir: str, n: int, m: int, pp: int, grid: bool,
                           micro_batches: int, steps: int = 8, kv_cache=None,
                           **model_kwargs):
    """Tokens and per-step logits of a (grid or TP) x PP layout vs the TP=1 model."""
    spec = ModelSpec(num_layers=4, **model_kwargs)
    prompt = torch.randint(0, 128, (BATCH, PROMPT), generator=torch.Generator().manual_seed(5))
    ref, pgs = _model(spec, 1, 1, 1, grid=False, seed=1234)
    save(ref, ckpt_dir)
    want = generate(ref, prompt, steps, pgs, micro_batches=1, keep_logits=True)
    megatron_mxn.destroy_mxn_parallel(destroy_model_parallel=True)
    model, pgs = _model(spec, n, m, pp, grid=grid, seed=99)
    load(model, ckpt_dir)
    got = generate(model, prompt, steps, pgs, micro_batches=micro_batches, keep_logits=True,
                   kv_cache=kv_cache)
    megatron_mxn.destroy_mxn_parallel(destroy_model_parallel=True)
    if not got.step_logits:  # not the last pipeline stage
        return None
    return {"tokens_equal": torch.equal(got.tokens, want.tokens),
            "logits_err": max(max_rel_err(a, b) for a, b in zip(got.step_logits,
                                                               want.step_logits)),
            "steps": len(got.step_end_s), "kv_cache": got.kv_cache}
