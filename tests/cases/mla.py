"""Multi-latent attention on the grid against megatron-core's MLA at TP=1 (worker-rank cases).

The reference is megatron-core's GPTModel with its local MLA layer spec, whose core attention
is the plugin's MlaDotProductAttention (the formula; megatron's local core cannot build MLA).
The grid model is the same spec through get_mxn_layer_spec. Weights go TP=1 -> grid through
dist_checkpointing (`checkpoint`) or in memory through both models' sharded_state_dicts.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from megatron.core import parallel_state
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.models.gpt.gpt_model import GPTModel

import megatron_mxn
from megatron_mxn import MxnMLATransformerConfig, with_mla_core
from megatron_mxn.inference.generation import generate
from tests.cases.common import (
    SEQ,
    ModelSpec,
    VOCAB,
    batch,
    full_layout,
    load,
    load_full,
    max_rel_err,
    save,
    seed_all,
    train_step,
    wrap_ddp,
)


@dataclasses.dataclass
class MlaModel:
    """A tiny DeepSeek-like MLA model (2 layers, hidden 64, 8 heads)."""

    q_lora_rank: Optional[int] = 48
    rope_type: str = "yarn"  # yarn | rope
    # MLA: RMSNorm of the q and kv latents (without a q latent megatron wants TE's fused
    # norm + linear for the q norm, which the local spec lacks: off then)
    qk_layernorm: bool = True
    padding_mask: bool = False
    recompute: bool = False  # selective recompute of the core attention
    seq: int = SEQ


def make_config(model: MlaModel, tp: int, m: int = 1, sp: bool = False,
                schedule: str = "exact") -> MxnMLATransformerConfig:
    return MxnMLATransformerConfig(
        num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=8,
        tensor_model_parallel_size=tp, mxn_dim_slices=m, sequence_parallel=sp,
        mxn_attention=schedule, q_lora_rank=model.q_lora_rank, kv_lora_rank=32,
        qk_head_dim=16, qk_pos_emb_head_dim=8, v_head_dim=12, rope_type=model.rope_type,
        # YaRN that changes the frequencies at 16 positions, with an mscale != 1 on both the
        # RoPE dims and the softmax scale
        rotary_scaling_factor=4.0, original_max_position_embeddings=4, mscale=1.0,
        mscale_all_dim=0.707, qk_layernorm=model.qk_layernorm, hidden_dropout=0.0,
        attention_dropout=0.0, params_dtype=torch.float32, pipeline_dtype=torch.float32,
        use_cpu_initialization=True,
        **({"recompute_granularity": "selective", "recompute_modules": ["core_attn"]}
           if model.recompute else {}))


def build(model: MlaModel, config, pgs, grid: bool):
    layer = with_mla_core(get_gpt_layer_local_spec(multi_latent_attention=True,
                                                   qk_layernorm=model.qk_layernorm,
                                                   normalization="RMSNorm"))
    if grid:
        layer = megatron_mxn.get_mxn_layer_spec(layer)
    return GPTModel(config, layer, VOCAB, SEQ, position_embedding_type="rope",
                    pre_process=parallel_state.is_pipeline_first_stage(),
                    post_process=parallel_state.is_pipeline_last_stage(), pg_collection=pgs)


def _step(model_spec: MlaModel, model, config, pgs):
    data = batch(_batch_spec(model_spec))
    record = train_step(wrap_ddp(model, config, pgs), config, data, pgs)
    return record, full_layout(model, lambda p: p.main_grad)


def _batch_spec(model: MlaModel) -> ModelSpec:
    """The shared batch helper's view of the model: its length and padding."""
    return ModelSpec(seq=model.seq, padding_mask=model.padding_mask)


def compare_mla_with_tp1(n: int, m: int, schedule: str = "exact", sp: bool = False,
                         ckpt_dir: Optional[str] = None, **model_kwargs):
    """Errors (worst element relative to the tensor's max) of the grid n x m against megatron's
    MLA at TP=1 with the same weights: logits, loss and every gradient (fp32)."""
    model_spec = MlaModel(**model_kwargs)
    pgs = megatron_mxn.initialize_mxn_parallel(1, 1, create_gloo_process_groups=False)
    seed_all()
    config = make_config(model_spec, tp=1)
    ref = build(model_spec, config, pgs, grid=False)
    weights = full_layout(ref, lambda p: p.data)
    if ckpt_dir:
        save(ref, ckpt_dir)
    truth, truth_grads = _step(model_spec, ref, config, pgs)
    megatron_mxn.destroy_mxn_parallel(destroy_model_parallel=True)

    pgs = megatron_mxn.initialize_mxn_parallel(n, m, create_gloo_process_groups=False)
    seed_all(99)  # a different init: the weights must come from the reference
    config = make_config(model_spec, tp=n * m, m=m, sp=sp, schedule=schedule)
    model = build(model_spec, config, pgs, grid=True)
    if ckpt_dir:
        load(model, ckpt_dir)
    else:
        load_full(model, weights)
    loaded = full_layout(model, lambda p: p.data)
    got, grads = _step(model_spec, model, config, pgs)
    megatron_mxn.destroy_mxn_parallel(destroy_model_parallel=True)

    assert sorted(grads) == sorted(truth_grads), (sorted(grads), sorted(truth_grads))
    out = {"grad": {k: max_rel_err(grads[k], truth_grads[k]) for k in grads},
           "weights": max(max_rel_err(loaded[k], weights[k]) for k in weights)}
    if "logits" in got:
        out["logits"] = max_rel_err(got["logits"], truth["logits"])
        out["loss"] = max_rel_err(got["loss"], truth["loss"])
    return out


def grid_roundtrip(n: int, m: int, ckpt_dir: str):
    """Save the grid's MLA model with dist_checkpointing and load it into a fresh grid model
    and into megatron's MLA at TP=1: every parameter comes back (the grid's shards of
    megatron's keys cover each tensor once). Returns {layout: {key: error}}."""
    model_spec = MlaModel()
    pgs = megatron_mxn.initialize_mxn_parallel(n, m, create_gloo_process_groups=False)
    seed_all()
    config = make_config(model_spec, tp=n * m, m=m)
    model = build(model_spec, config, pgs, grid=True)
    before = full_layout(model, lambda p: p.data)
    save(model, ckpt_dir)
    seed_all(5)
    fresh = build(model_spec, config, pgs, grid=True)
    load(fresh, ckpt_dir)
    after = {"grid": full_layout(fresh, lambda p: p.data)}
    megatron_mxn.destroy_mxn_parallel(destroy_model_parallel=True)
    pgs = megatron_mxn.initialize_mxn_parallel(1, 1, create_gloo_process_groups=False)
    seed_all(6)
    tp1 = build(model_spec, make_config(model_spec, tp=1), pgs, grid=False)
    load(tp1, ckpt_dir)
    after["tp1"] = full_layout(tp1, lambda p: p.data)
    megatron_mxn.destroy_mxn_parallel(destroy_model_parallel=True)
    return {name: {k: max_rel_err(got[k], before[k]) for k in before}
            for name, got in after.items()}


# ---------------------------------------------------------------- decode
def _generate(model, pgs, prompt, steps, counted_steps=None, **kwargs):
    """generate() with keep_logits; counted_steps: count the collectives of those steps."""
    from megatron_mxn.accounting import CommCounter

    if counted_steps is None:
        return generate(model, prompt, steps, pgs, keep_logits=True, **kwargs), None
    with CommCounter() as counter:
        counter.recording = False
        out = generate(model, prompt, steps, pgs, keep_logits=True,
                       before_step=lambda s: setattr(counter, "recording",
                                                     s in counted_steps), **kwargs)
    return out, {"bytes": counter.total_sent_bytes(), "calls": sum(counter.counts.values())}


def decode_matches_tp1(n: int, m: int, prompt: int = 8, steps: int = 8, batch_size: int = 2,
                       prompt_lengths=None, prefill_chunk=None, reference: bool = True,
                       **model_kwargs):
    """Greedy generation of the grid n x m (the latent cache sharded by position, absorbed
    queries) against megatron's MLA at TP=1 (its static cache of up-projected K/V), from the
    same weights: tokens, per-step logits (worst element relative to the max), this rank's
    latent cache bytes, and the collectives of the decode steps (bytes, calls).
    reference=False: the grid alone (its collectives and cache; long prompts)."""
    model_spec = MlaModel(**model_kwargs)
    ids = torch.randint(0, VOCAB, (batch_size, prompt),
                        generator=torch.Generator().manual_seed(5))
    options = dict(prompt_lengths=prompt_lengths, prefill_chunk=prefill_chunk)
    if reference:
        pgs = megatron_mxn.initialize_mxn_parallel(1, 1, create_gloo_process_groups=False)
        seed_all()
        ref = build(model_spec, make_config(model_spec, tp=1), pgs, grid=False).eval()
        weights = full_layout(ref, lambda p: p.data)
        want, _ = _generate(ref, pgs, ids, steps, **options)
        megatron_mxn.destroy_mxn_parallel(destroy_model_parallel=True)

    pgs = megatron_mxn.initialize_mxn_parallel(n, m, create_gloo_process_groups=False)
    seed_all(99)
    config = make_config(model_spec, tp=n * m, m=m)
    model = build(model_spec, config, pgs, grid=True).eval()
    if reference:
        load_full(model, weights)
    got, comm = _generate(model, pgs, ids, steps, counted_steps=range(2, steps), **options)
    megatron_mxn.destroy_mxn_parallel(destroy_model_parallel=True)
    if not reference:
        return {"cache_bytes": got.kv_cache_bytes, "comm": comm}
    return {"tokens_equal": torch.equal(got.tokens, want.tokens),
            "tokens": got.tokens.tolist(),
            "logits": max(max_rel_err(a, b) for a, b in zip(got.step_logits, want.step_logits)),
            "cache_bytes": got.kv_cache_bytes, "tp1_cache_bytes": want.kv_cache_bytes,
            "kv_cache": got.kv_cache, "comm": comm,
            "context": max(prompt_lengths or [prompt]) + steps}
