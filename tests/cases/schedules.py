"""Core-attention cases for the schedules: sliced against plain torch, auto's choices."""

from __future__ import annotations

import logging
import math

import torch
from megatron.core.transformer.enums import AttnMaskType

import megatron_mxn
from megatron_mxn.attention.core import MxnDotProductAttention
from megatron_mxn.attention.self_attention import grid_layout
from tests.cases.common import ModelSpec, l2_rel_err, make_config, max_rel_err


def _core(n: int, m: int, schedule: str, **model_kwargs):
    spec = ModelSpec(**model_kwargs)
    pgs = megatron_mxn.initialize_mxn_parallel(n, m, create_gloo_process_groups=False)
    config = make_config(spec, tp=n * m, m=m, mxn_attention=schedule)
    core = MxnDotProductAttention(config, 1, AttnMaskType.causal, "self", pg_collection=pgs)
    grid = megatron_mxn.get_grid()
    return spec, config, core, grid


def sliced_matches_plain_torch(n: int, m: int, sq: int = 12, b: int = 2, **model_kwargs):
    """The rank's output and Q/K/V gradients vs plain-torch attention with h*m heads of d/m
    dims (head (a, j) = dims slice j of head a), causal, scale 1/sqrt(d/m)."""
    spec, config, core, grid = _core(n, m, "sliced", **model_kwargs)
    h, g, d = spec.heads, spec.kv_heads, spec.head_dim
    layout = grid_layout(config, n, m, rotary_percent=1.0)
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(sq, b, h, d, generator=gen, dtype=torch.float64)
    k = torch.randn(sq, b, g, d, generator=gen, dtype=torch.float64)
    v = torch.randn(sq, b, g, d, generator=gen, dtype=torch.float64)
    dout = torch.randn(sq, b, h, d, generator=gen, dtype=torch.float64)

    # Reference: h*m heads of d/m dims, written from the formula.
    slices = [layout.dims(j) for j in range(m)]
    qs = torch.stack([q[..., idx] for idx in slices], dim=3)  # [sq, b, h, m, d/m]
    ks = torch.stack([k.repeat_interleave(h // g, dim=2)[..., idx] for idx in slices], dim=3)
    vs = torch.stack([v.repeat_interleave(h // g, dim=2)[..., idx] for idx in slices], dim=3)
    ref_q, ref_k, ref_v = (t.clone().requires_grad_() for t in (q, k, v))
    rq = torch.stack([ref_q[..., idx] for idx in slices], dim=3)
    rk = torch.stack([ref_k.repeat_interleave(h // g, dim=2)[..., idx] for idx in slices], 3)
    rv = torch.stack([ref_v.repeat_interleave(h // g, dim=2)[..., idx] for idx in slices], 3)
    scores = torch.einsum("qbhjd,kbhjd->bhjqk", rq, rk) / math.sqrt(d // m)
    causal = torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)
    probs = scores.masked_fill(causal, float("-inf")).softmax(-1)
    ref_out = torch.einsum("bhjqk,kbhjd->qbhjd", probs, rv)  # [sq, b, h, m, d/m]
    dslices = torch.stack([dout[..., idx] for idx in slices], dim=3)
    (ref_out * dslices).sum().backward()
    del qs, ks, vs

    # This rank: heads of group i, dims of slice j.
    i, j = grid.head_group_index, grid.dim_slice_index
    hq = h // n
    kv = [layout.kv_head_of(i)] if layout.kv_shared else list(range(i * g // n,
                                                                    (i + 1) * g // n))
    idx = slices[j]
    mine = [t.float().requires_grad_() for t in (q[:, :, i * hq:(i + 1) * hq][..., idx],
                                                  k[:, :, kv][..., idx], v[:, :, kv][..., idx])]
    out = core(*mine, attention_mask=causal.view(1, 1, sq, sq))
    (out.view(sq, b, hq, len(idx)) * dout[:, :, i * hq:(i + 1) * hq][..., idx].float()).sum() \
        .backward()
    want = ref_out[:, :, i * hq:(i + 1) * hq, j]
    err = {"out": max_rel_err(out.view(sq, b, hq, -1).double(), want.detach()),
           "dq": max_rel_err(mine[0].grad.double(),
                             ref_q.grad[:, :, i * hq:(i + 1) * hq][..., idx])}
    if not layout.kv_shared:  # shared KV heads get grads from several groups
        err["dk"] = max_rel_err(mine[1].grad.double(), ref_k.grad[:, :, kv][..., idx])
        err["dv"] = max_rel_err(mine[2].grad.double(), ref_v.grad[:, :, kv][..., idx])
    megatron_mxn.destroy_mxn_parallel(destroy_model_parallel=True)
    return err


class _Lines(logging.Handler):
    """The messages logged while it is attached (the pool's ranks are other processes: this
    stands in for pytest's caplog)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def auto_choices(n: int, m: int, prefill: int, **model_kwargs):
    """Run auto on a long prefill then two decode steps' shapes; the decisions it recorded and
    the INFO lines it logged to the "megatron_mxn" logger."""
    spec, config, core, grid = _core(n, m, "auto", **model_kwargs)
    core.eval()  # (inference: the log names the phase prefill, not training)
    h, g, d = spec.heads, spec.kv_heads, spec.head_dim
    hq, gk, dl = h // n, max(g // n, 1), d // m
    b = 1
    logger, lines = logging.getLogger("megatron_mxn"), _Lines()
    level = logger.level
    logger.addHandler(lines)
    logger.setLevel(logging.INFO)
    try:
        with torch.no_grad():
            for sq, sk in ((prefill, prefill), (1, prefill + 1), (1, prefill + 2)):
                mask = torch.triu(torch.ones(sq, sk, dtype=torch.bool), diagonal=1 + sk - sq)
                core(torch.randn(sq, b, hq, dl), torch.randn(sk, b, gk, dl),
                     torch.randn(sk, b, gk, dl), attention_mask=mask.view(1, 1, sq, sk))
    finally:
        logger.removeHandler(lines)
        logger.setLevel(level)
    megatron_mxn.destroy_mxn_parallel(destroy_model_parallel=True)
    return core.decisions, "\n".join(lines.lines)


def fused_dropout_is_consistent(n: int, m: int, schedule: str, sq: int = 16, b: int = 2,
                                draws: int = 48):
    """Attention dropout in a fused schedule (seq, sliced), which cannot share megatron's masks.
    For one draw the core is linear in V: out = A V, with A the dropped, rescaled probabilities,
    so sum(G * out) = sum(A^T G * V) = sum(dV * V) holds exactly iff backward dropped what
    forward dropped. Also: a reseed reproduces the draw, and the mean over draws approaches the
    output without dropout (inverted dropout is unbiased)."""
    import torch.distributed as dist

    from tests.cases.common import seed_all

    spec, config, core, grid = _core(n, m, schedule, attention_dropout=0.5)
    hq, gk, dl = spec.heads // n, max(spec.kv_heads // n, 1), spec.head_dim // m
    gen = torch.Generator().manual_seed(11 + dist.get_rank())
    q, k, v, grad = (torch.randn(sq, b, heads, dl, generator=gen)
                     for heads in (hq, gk, gk, hq))

    def draw(seed):
        seed_all(seed)
        vv = v.clone().requires_grad_()
        out = core(q, k, vv, attention_mask=None)
        out.backward(grad.view(sq, b, -1))
        pair = torch.stack([(grad.view(sq, b, -1) * out).sum(), (vv.grad * vv).sum()]).double()
        dist.all_reduce(pair)  # both sums over the whole head group's dims
        return out.detach(), pair

    core.train()
    first, pair = draw(5)
    again, _ = draw(5)
    outs = [draw(100 + t)[0] for t in range(draws)]
    core.eval()
    with torch.no_grad():
        plain = core(q, k, v, attention_mask=None)
    megatron_mxn.destroy_mxn_parallel(destroy_model_parallel=True)
    return {"linear_identity_err": (pair[0] - pair[1]).abs().item() / pair[1].abs().item(),
            "reproducible": torch.equal(first, again),
            "dropped_something": not torch.allclose(first, plain),
            "draw_rel_err": l2_rel_err(first, plain),
            "mean_rel_err": l2_rel_err(torch.stack(outs).mean(0), plain)}
