"""Attention options (windows, sinks, RoPE variants, ...): the grid against megatron-core's own
TP=1 model, several variants per call, weights handed over in memory (common.load_full)."""

from __future__ import annotations

import dataclasses
from typing import Dict, List

import torch
from megatron.core.transformer.dot_product_attention import DotProductAttention

import megatron_mxn
from megatron_mxn.inference.generation import greedy_generate
from tests.cases.common import (
    ModelSpec,
    batch,
    build_model,
    full_layout,
    load_full,
    make_config,
    max_rel_err,
    seed_all,
    train_step,
    wrap_ddp,
)


def _train(spec: ModelSpec, n: int, m: int, config_extra: dict, model_extra: dict, full=None,
           schedule="auto"):
    """One training step of megatron's TP=1 model (full is None: fresh weights, returned) or
    of the grid n x m loaded from `full`: (record, full-layout grads, full weights)."""
    pgs = megatron_mxn.initialize_mxn_parallel(n, m, create_gloo_process_groups=False)
    seed_all(1234 if full is None else 99)
    fields = {f.name for f in dataclasses.fields(megatron_mxn.MxnTransformerConfig)}
    config = make_config(spec, tp=n * m, m=m, mxn_attention=schedule,
                         **{k: v for k, v in config_extra.items() if k in fields})
    for name, value in config_extra.items():  # attributes megatron reads off the config
        if name not in fields:                 # without declaring them (yarn_*)
            setattr(config, name, value)
    model = build_model(spec, config, pgs, grid=full is not None, **model_extra)
    if full is None:
        full = full_layout(model, lambda p: p.data)
    else:
        load_full(model, full)
    record = train_step(wrap_ddp(model, config, pgs), config, batch(spec), pgs)
    # each core attention's (softmax_scale, the softmax's own scale), by layer
    record["scales"] = [(c.softmax_scale, c.scale_mask_softmax.scale) for c in model.modules()
                        if isinstance(c, DotProductAttention)]
    # the schedules `auto` chose (MxnDotProductAttention.decisions; empty for a named one)
    record["chosen"] = sorted({d[3] for c in model.modules() for d in getattr(c, "decisions", ())})
    grads = full_layout(model, lambda p: p.main_grad)
    megatron_mxn.destroy_mxn_parallel(destroy_model_parallel=True)
    return record, grads, full


def variants_match_tp1(n: int, m: int, variants: List[dict]) -> List[Dict[str, float]]:
    """For each variant {"name", "spec": ModelSpec kwargs, "config": TransformerConfig kwargs,
    "model": GPTModel kwargs, "schedules": [...]}: the worst relative error of logits, loss and every gradient of the
    grid under each schedule against megatron-core's TP=1 model with the same weights.
    Config kwargs that are not TransformerConfig fields (yarn_*) are set as attributes. With
    "plain": {"spec", "config", "model"} (overrides of the variant's spec; the plain model's
    config/model kwargs), "vs_plain" is how far the variant's TP=1 logits are from that plain
    TP=1 model's on the same weights (a variant that silently does nothing gives ~0), and
    "vs_plain_all" the same in the measure of "err" (the worst of logits, loss and every
    gradient the two models share); "scales"
    / "ref_scales": each core attention's (softmax_scale, scale_mask_softmax.scale) on the grid
    / in the TP=1 model; "chosen": the schedules `auto` picked on the grid."""
    out = []
    for v in variants:
        spec = ModelSpec(**v.get("spec", {}))
        config, model = v.get("config", {}), v.get("model", {})
        ref, ref_grads, full = _train(spec, 1, 1, config, model)
        vs_plain = vs_plain_all = None
        if "plain" in v:  # megatron's TP=1 model without the variant, on the variant's weights
            plain = v["plain"]
            base, base_grads, _ = _train(
                ModelSpec(**{**v.get("spec", {}), **plain.get("spec", {})}), 1, 1,
                plain.get("config", {}), plain.get("model", {}), full)
            vs_plain = max_rel_err(ref["logits"], base["logits"])
            vs_plain_all = max([max_rel_err(base[k], ref[k]) for k in ("logits", "loss")] +
                               [max_rel_err(base_grads[k], ref_grads[k])
                                for k in ref_grads if k in base_grads])
        for schedule in v.get("schedules", ["auto"]):
            got, grads, _ = _train(spec, n, m, config, model, full, schedule)
            assert sorted(grads) == sorted(ref_grads), (sorted(grads), sorted(ref_grads))
            errs = {"grad/" + k: max_rel_err(grads[k], ref_grads[k]) for k in grads}
            errs["logits"] = max_rel_err(got["logits"], ref["logits"])
            errs["loss"] = max_rel_err(got["loss"], ref["loss"])
            worst = max(errs, key=errs.get)
            out.append({"name": v["name"], "schedule": schedule, "worst": worst,
                        "err": errs[worst], "logits": errs["logits"], "vs_plain": vs_plain,
                        "vs_plain_all": vs_plain_all,
                        "grad_keys": sorted(grads),
                        "scales": got["scales"], "ref_scales": ref["scales"],
                        "chosen": got["chosen"]})
    return out


def _generate(spec, n, m, grid, config_extra, full, tokens, steps, schedule="auto", **options):
    from tests.cases.common import teardown

    pgs = megatron_mxn.initialize_mxn_parallel(n, m, create_gloo_process_groups=False)
    seed_all(1234 if full is None else 99)
    config = make_config(spec, tp=n * m, m=m if grid else 1, mxn_attention=schedule,
                         **config_extra)
    model = build_model(spec, config, pgs, grid=grid, max_seq=64).eval()
    if full is None:
        full = full_layout(model, lambda p: p.data)
    else:
        load_full(model, full)
    out = greedy_generate(model, tokens, steps, pgs.tp, **options)
    teardown()
    return out, full


def decode_variants_match_tp1(n: int, m: int, variants: List[dict], steps: int = 12):
    """For each variant {"name", "spec", "config", "runs": [{"schedule", "kv_cache",
    "prompt_lengths", "prefill_chunk"}]}: greedy tokens and per-step logits of the grid against
    megatron-core's TP=1 model with the same weights (prefill + decode with the KV cache).
    TP=1 prefills whole prompts; the grid may prefill in chunks."""
    out = []
    for v in variants:
        spec = ModelSpec(**v.get("spec", {}))
        config = v.get("config", {})
        for run in v["runs"]:
            run = dict(run)
            lengths = run.get("prompt_lengths")
            tokens = torch.randint(0, 128, (len(lengths) if lengths else 2, 10),
                                   generator=torch.Generator().manual_seed(3))
            want, full = _generate(spec, 1, 1, False, config, None, tokens, steps,
                                   prompt_lengths=lengths)
            # megatron's TP=1 model on the same weights without window and sinks
            plain, _ = _generate(dataclasses.replace(spec, window_size=None,
                                                     softmax_type="vanilla"),
                                 1, 1, True, {}, full, tokens, steps, prompt_lengths=lengths)
            got, _ = _generate(spec, n, m, True, config, full, tokens, steps, **run)
            out.append({"name": v["name"], **run,
                        "tokens_equal": torch.equal(got.tokens, want.tokens),
                        "kv_cache_used": got.kv_cache,
                        "changes_model": max(max_rel_err(a, b) for a, b in
                                             zip(want.step_logits, plain.step_logits)),
                        "logits_err": max(max_rel_err(a, b) for a, b in
                                          zip(got.step_logits, want.step_logits))})
    return out
