"""Cases beyond one training step: KV-cache decoding, checkpoint round trips, dropout streams,
the CPU RNG tracker, and bad input."""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.models.gpt.gpt_model import GPTModel
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

import megatron_mxn
from megatron_mxn.inference.generation import greedy_generate
from tests.cases.common import (
    SEQ,
    VOCAB,
    ModelSpec,
    build_model,
    PROMPT_LENGTH,
    full_layout,
    grid_model,
    init_grid,
    load,
    make_config,
    max_rel_err,
    random_prompt,
    save,
    seed_all,
    teardown,
)

def decode_matches_tp1(ckpt_dir: str, n: int, m: int, steps: int = 16, schedule: str = "exact",
                       kv_cache: str = "dims", prompt_lengths=None, prefill_chunk=None,
                       prompt: int = PROMPT_LENGTH, **model_kwargs):
    """Prefill + `steps` greedy decode steps with the static KV cache, grid vs TP=1 (`auto`:
    the sequence-split core prefills, the score all-reduce decodes; kv_cache positions: the
    position-sharded cache decodes)."""
    spec = ModelSpec(**model_kwargs)
    options = dict(prompt_lengths=prompt_lengths, prefill_chunk=prefill_chunk)
    tokens = random_prompt(len(prompt_lengths) if prompt_lengths else 2, prompt)
    ref, pgs = grid_model(spec, 1, 1, grid=False)
    save(ref, ckpt_dir)
    ref.eval()
    want = greedy_generate(ref, tokens, steps + 1, pgs.tp, **options)
    teardown()
    model, pgs = grid_model(spec, n, m, grid=True, seed=99, schedule=schedule)
    load(model, ckpt_dir)
    model.eval()
    got = greedy_generate(model, tokens, steps + 1, pgs.tp, kv_cache=kv_cache, **options)
    teardown()
    return {
        "tokens_equal": torch.equal(got.tokens, want.tokens),
        "logits_err": max(max_rel_err(a, b) for a, b in zip(got.step_logits, want.step_logits)),
        "kv_bytes": got.kv_cache_bytes,
        "kv_bytes_tp1": want.kv_cache_bytes,
        "kv_cache": got.kv_cache,
        "max_seq": max(prompt_lengths or [prompt]) + steps + 1,
        "tokens": got.tokens.tolist(),
    }


def checkpoint_round_trip(dirs, **model_kwargs):
    """TP=4 -> grid 2x2 -> TP=4, and grid 2x2 -> TP=1: every tensor bit-identical."""
    spec = ModelSpec(**model_kwargs)
    weights = []
    for step, (n, m, grid, load_from, save_to) in enumerate([
        (4, 1, False, None, dirs[0]),  # TP=4 writes
        (2, 2, True, dirs[0], dirs[1]),  # grid reads TP=4, writes
        (4, 1, False, dirs[1], None),  # TP=4 reads the grid's
        (1, 1, False, dirs[1], None),  # TP=1 reads the grid's
    ]):
        model, _ = grid_model(spec, n, m, grid, seed=100 + step)
        if load_from:
            load(model, load_from)
        if save_to:
            save(model, save_to)
        weights.append(full_layout(model, lambda p: p.data))
        teardown()
    first = weights[0]
    return [sorted(w) == sorted(first) and all(torch.equal(w[k], first[k]) for k in first)
            for w in weights[1:]]


def dropout_masks(n: int, m: int):
    """Attention dropout under the grid: the m dim-slice ranks of a head group drop the same
    entries; different head groups draw different masks; reseeding reproduces them."""
    spec = ModelSpec(attention_dropout=0.5, num_layers=1)
    model, pgs = grid_model(spec, n, m, grid=True)
    model.train()
    masks, kept = [], []
    attn = model.decoder.layers[0].self_attention.core_attention

    def record(module, args, out):
        masks.append((out == 0) & (args[0] != 0))
        kept.append((args[0] != 0).sum().item())

    hook = attn.attention_dropout.register_forward_hook(record)
    tokens = random_prompt()
    pos = torch.arange(PROMPT_LENGTH).expand(2, PROMPT_LENGTH)
    for _ in range(2):
        seed_all(5)
        model(tokens, pos, None)
    hook.remove()
    grid = megatron_mxn.get_grid()
    mask = masks[0].to(torch.uint8)
    slices = [torch.empty_like(mask) for _ in range(m)]
    dist.all_gather(slices, mask, group=grid.dim_slice_group)
    heads = [torch.empty_like(mask) for _ in range(n)]
    dist.all_gather(heads, mask, group=grid.head_group_group)
    teardown()
    return {
        "same_in_dim_slice_group": all(torch.equal(s, mask) for s in slices),
        "differs_across_head_groups": n == 1 or not torch.equal(heads[0], heads[1]),
        "reproducible": torch.equal(masks[0], masks[1]),
        "dropped_fraction": masks[0].sum().item() / kept[0],  # of the unmasked entries
    }


def rng_tracker_forks(tp: int):
    """CPU mode: megatron's model-parallel RNG stream differs per TP rank, is reproducible, and
    forking it leaves the default stream untouched."""
    megatron_mxn.initialize_mxn_parallel(tp, 1, create_gloo_process_groups=False)
    seed_all(11)
    with get_cuda_rng_tracker().fork():
        forked = torch.rand(4)
    after_fork = torch.rand(4)
    seed_all(11)
    plain = torch.rand(4)
    with get_cuda_rng_tracker().fork():
        forked_again = torch.rand(4)
    gathered = [torch.empty(4) for _ in range(tp)]
    dist.all_gather(gathered, forked, group=parallel_state.get_tensor_model_parallel_group())
    teardown()
    return {
        "reproducible": torch.equal(forked, forked_again),
        "default_stream_untouched": torch.equal(after_fork, plain),
        "distinct_per_tp_rank": len({tuple(g.tolist()) for g in gathered}) == tp,
    }


# ------------------------------------------------------------------ bad input: each raises
def bad_heads_not_divisible():
    grid_model(ModelSpec(heads=6, kv_heads=6), 4, 1, grid=True)


def bad_kv_groups():
    grid_model(ModelSpec(heads=12, kv_heads=3, hidden=48), 2, 2, grid=True)


def bad_head_dim_for_rope():
    grid_model(ModelSpec(head_dim=12), 1, 4, grid=True)


def bad_tp_size():
    megatron_mxn.initialize_mxn_parallel(2, 2, tensor_model_parallel_size=2)


def bad_world_size():
    megatron_mxn.initialize_mxn_parallel(3, 1)


def bad_context_parallel():
    megatron_mxn.initialize_mxn_parallel(1, 2, context_parallel_size=2)


def bad_unsupported_option():
    spec = ModelSpec()
    pgs = init_grid(2, 2, grid=True)
    config = make_config(spec, tp=4, m=2, attention_output_gate=True)
    build_model(spec, config, pgs, grid=True)


def bad_rotary_percent_of_spec():
    """The spec built for RoPE over the whole head, the model rotating half of it: refused
    while the model is built (before any checkpoint could be loaded into the wrong rows)."""
    spec = ModelSpec(rotary_percent=0.5)
    pgs = init_grid(2, 2, grid=True)
    config = make_config(spec, tp=4, m=2)
    layer = megatron_mxn.get_mxn_layer_spec(get_gpt_layer_local_spec(), rotary_percent=1.0)
    GPTModel(config, layer, VOCAB, SEQ, position_embedding_type="rope", rotary_percent=0.5,
             pg_collection=pgs)


def attention_attributes():
    """The attributes megatron's SelfAttention sets in __init__ (and its forward reads) that
    MxnSelfAttention, which cannot run that __init__, does not set."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    spec = ModelSpec()
    pgs = init_grid(2, 2, grid=True)
    config = make_config(spec, tp=4, m=2)
    stock_spec = get_gpt_layer_local_spec().submodules.self_attention
    grid_spec = megatron_mxn.get_mxn_layer_spec(get_gpt_layer_local_spec(), dim_slices=2)
    stock = stock_spec.module(config, stock_spec.submodules, 1, pg_collection=pgs,
                              **stock_spec.params)
    grid = grid_spec.submodules.self_attention
    mxn = grid.module(config, grid.submodules, 1, pg_collection=pgs, **grid.params)
    teardown()
    return sorted(set(vars(stock)) - set(vars(mxn)))
