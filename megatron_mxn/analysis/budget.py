"""Batch at a KV-cache budget: the largest batch a layout holds when every rank has the same
memory for its KV cache, and (for the planner) what that batch is predicted to deliver.

A layout that keeps less KV cache per rank holds more sequences in the same memory: the grid
keeps 1/(n*m) of the cache per rank while n <= g, and TP beyond the g KV heads replicates it.
The CPU A/B (megatron_mxn/tools/kv_budget.py) runs the batches this module computes; the
planner (`python -m megatron_mxn.tools.plan --kv-budget GIB`) predicts them on GPUs. For an MLA
model the cache is the latent (megatron_mxn.analysis.mla): `mla_budget_rows`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Dict, List, Optional, Sequence

from megatron_mxn.analysis import mla
from megatron_mxn.analysis.cost_model import Layout, ModelShape, kv_cache_bytes, resolve_kv_cache
from megatron_mxn.analysis.mla import MlaModel, MlaPrediction, MlaServing
from megatron_mxn.analysis.planner import Cluster, Prediction, Workload, predict
from megatron_mxn.grid.layout import MxnConfigError


def largest_batch(model: ModelShape, layout: Layout, budget_bytes: float, context: int,
                  micro_batches: Optional[int] = None) -> int:
    """The largest batch of one model replica (a multiple of its inference micro-batches,
    default PP) whose KV cache per rank for `context` positions fits `budget_bytes`; 0 when
    not even one micro-batch of one sequence each fits. `layout.kv_cache` must be resolved."""
    micro = micro_batches or layout.micro_batches or layout.pp
    if budget_bytes <= 0 or context < 1 or micro < 1:
        raise MxnConfigError("the KV budget, the context and the micro-batches must be positive")
    per_sequence = kv_cache_bytes(model, layout, 1, context)  # (the cache is linear in batch)
    batch = int(budget_bytes // per_sequence) // micro * micro
    assert batch == 0 or kv_cache_bytes(model, layout, batch, context) <= budget_bytes
    return batch


@dataclass
class BudgetRow:
    """One layout at one prompt length under the budget: the batch over all replicas
    (per replica x DP) and its prediction (None when no batch fits)."""

    name: str  # the config's layout name
    layout: str  # Layout.name
    prompt: int
    batch: int
    per_sequence_B: int  # KV cache per rank of one sequence
    kv_B: int  # KV cache per rank at that batch
    prediction: Optional[Prediction]

    @property
    def decode_tokens_per_s(self) -> float:
        """Output tokens per second in steady decode: the batch over the TPOT."""
        p = self.prediction
        return self.batch / p.tpot_s if p and p.tpot_s else 0.0


def budget_rows(model: ModelShape, cluster: Cluster, layouts: Dict[str, Layout],
                budget_bytes: float, prompts: Sequence[int], new_tokens: int,
                prefill_chunk: int = 0) -> List[BudgetRow]:
    """For each prompt length and layout: the largest batch at `budget_bytes` of KV cache per
    GPU, and the planner's prediction of that batch (TTFT, TPOT, tokens/s, memory)."""
    rows = []
    for prompt in prompts:
        context = prompt + new_tokens
        for name, layout in layouts.items():
            resolved = resolve_kv_cache(model, layout, 1, prompt, new_tokens)
            per_replica = largest_batch(model, resolved, budget_bytes, context)
            batch = per_replica * layout.dp
            prediction = None
            if batch:
                prediction = predict(model, replace(layout, micro_batches=None), cluster,
                                     Workload("infer", batch, prompt, new_tokens,
                                              prefill_chunk=prefill_chunk))
            rows.append(BudgetRow(name, resolved.name, prompt, batch,
                                  kv_cache_bytes(model, resolved, 1, context),
                                  kv_cache_bytes(model, resolved, per_replica, context),
                                  prediction))
    return rows


@dataclass
class MlaBudgetRow:
    """One MLA serving layout at one prompt length under the cache budget: the batch over all
    replicas and its decode prediction (None when no batch fits)."""

    name: str  # the config's layout name
    layout: MlaServing
    prompt: int
    per_sequence_B: int  # latent (or static) cache per GPU of one sequence
    prediction: Optional[MlaPrediction]

    @property
    def batch(self) -> int:
        return self.prediction.batch if self.prediction else 0


def mla_budget_rows(model: MlaModel, cluster: Cluster, layouts: Dict[str, MlaServing],
                    budget_bytes: float, prompts: Sequence[int],
                    new_tokens: int) -> List[MlaBudgetRow]:
    """For each prompt length and MLA layout: the largest batch whose cache per GPU (after
    `new_tokens`) fits `budget_bytes`, and that batch's decode step at the mean context."""
    rows = []
    for prompt in prompts:
        context = prompt + new_tokens
        for name, layout in layouts.items():
            batch = mla.largest_batch(model, layout, budget_bytes, context)
            prediction = (mla.predict_decode(model, layout, cluster, batch,
                                             prompt + new_tokens // 2) if batch else None)
            rows.append(MlaBudgetRow(name, layout, prompt,
                                     mla.cache_bytes(model, layout, 1, context), prediction))
    return rows
