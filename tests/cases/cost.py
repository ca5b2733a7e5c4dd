"""Measured collectives, weights and KV cache of a generation vs megatron_mxn.analysis.cost_model."""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state

import megatron_mxn
from megatron_mxn.accounting import CommCounter, count_rows, sent_bytes_by_group
from megatron_mxn.analysis.cost_model import (
    Layout,
    ModelShape,
    kv_cache_bytes,
    layer_collectives,
    step_collectives,
    weight_bytes,
)
from megatron_mxn.inference.generation import generate
from tests.cases.common import VOCAB, ModelSpec, build_model, make_config, seed_all

BATCH, PROMPT, NEW = 4, 8, 3


def shape_of(spec: ModelSpec) -> ModelShape:
    """The test model (tests/cases/common.py) as the cost model sees it."""
    return ModelShape(layers=spec.num_layers, hidden=spec.hidden, heads=spec.heads,
                      kv_heads=spec.kv_heads, head_dim=spec.head_dim, ffn=4 * spec.hidden,
                      vocab=VOCAB, qk_norm=spec.qk_norm, elem_bytes=4, untied=True,
                      vocab_divisible_by=1, normalization="LayerNorm", bias=True)


def measured_vs_predicted(n: int, m: int, pp: int, grid: bool, schedule: str = "exact",
                          micro_batches: int = 2, kv_cache: str = "dims", prompt_len: int = PROMPT,
                          **model_kwargs):
    spec = ModelSpec(num_layers=4, **model_kwargs)
    pgs = megatron_mxn.initialize_mxn_parallel(n, m, pipeline_model_parallel_size=pp,
                                               create_gloo_process_groups=False)
    seed_all()
    config = make_config(spec, tp=n * m, pp=pp, m=m if grid else 1, mxn_attention=schedule)
    model = build_model(spec, config, pgs, grid=grid, max_seq=64).eval()
    g = megatron_mxn.get_grid()
    labels = {"TP": pgs.tp, **g.labels(), "PP": pgs.pp}
    prompt = torch.randint(0, VOCAB, (BATCH, prompt_len),
                           generator=torch.Generator().manual_seed(1))
    steps, layer_bytes = [], []

    def before_step(step):
        layer_bytes.append(counter.sent_bytes_by_layer())
        steps.append(counter.reset())

    with CommCounter(labels) as counter:
        counter.mark_inside(model.decoder.layers)
        result = generate(model, prompt, NEW, pgs, micro_batches, before_step=before_step,
                          kv_cache=kv_cache)
        before_step(NEW)
    measured = steps[1:]  # the counts of step k are taken when step k + 1 starts
    layout = Layout(tp=n * m, pp=pp, dim_slices=m if grid else 1, schedule=schedule,
                    micro_batches=micro_batches, kv_cache=kv_cache)
    stage = parallel_state.get_pipeline_model_parallel_rank()
    shape = shape_of(spec)
    predicted = [step_collectives(shape, layout, BATCH, prompt_len, k, NEW, stage)
                 for k in range(NEW)]
    # Every layer of this stage sends, in a decode step, what layer_collectives predicts.
    mb = BATCH // micro_batches
    want_layer = {group: sent * micro_batches for group, sent in sent_bytes_by_group(
        layer_collectives(shape, layout, mb, 1, prompt_len + NEW - 1)).items()}
    last_decode = layer_bytes[-1]
    layer_ok = (len(last_decode) == spec.num_layers // pp
                and all(by == want_layer for by in last_decode.values()))
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    out = {"rank": dist.get_rank(), "per_layer": (layer_ok, last_decode, want_layer),
           "steps": [(count_rows(a), count_rows(b)) for a, b in zip(measured, predicted)],
           "weights": (params, weight_bytes(shape, layout, stage)),
           "kv": (result.kv_cache_bytes, kv_cache_bytes(shape, layout, BATCH, prompt_len + NEW)),
           "decode_sent": sent_bytes_by_group(measured[-1])}
    megatron_mxn.destroy_mxn_parallel(destroy_model_parallel=True)
    return out

