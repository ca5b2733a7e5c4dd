"""Fused attention for the sequence-split core and the `sliced` schedule (docs/design.md).

A rank attends a few query rows, at absolute positions q_offset .. q_offset + sq - 1, to keys at
positions 0 .. sk - 1 with the full head dim; which keys each row sees is one MaskSpec
(mask.py: causal, window, padding). Keys that no row sees are sliced off first (a causal chunk
sees [0, q_offset + sq), a windowed one its band), and a binding left window runs in query tiles,
so without a padding mask no sq x sk tensor is built: memory stays O(s) (O(s * window)). An
attention sink is one more always-visible key (_with_sink_key), so every path below takes it.

Which path runs (backend "torch"; "auto" is the same: torch's SDPA serves every accepted case):

  case                      CPU                                    CUDA / other devices
  no mask                   SDPA flash (enable_gqa)                SDPA, K/V expanded to hq heads
  causal, q_offset == 0     SDPA flash, is_causal (square block)   SDPA is_causal, K/V expanded
  causal, q_offset > 0      _OffsetCausalFlash: private CPU flash  SDPA + causal_lower_right
                            op on past + diagonal block, LSE merge (flash/mem-efficient, no mask)
    private ops missing     SDPA + materialised mask, warns once   -
  padding or a window       SDPA with the bool mask of the band    same (materialising unavoidable)
  dropout_p > 0             as above with SDPA's dropout, except   as above, SDPA's dropout
                            an offset causal chunk: materialised
                            mask (no warning: SDPA's dropout on
                            CPU is the math kernel, s^2 anyway)
  backend "unfused"         fp32 matmul + masked softmax (+ F.dropout): the reference path

attention_with_lse (the position-sharded KV cache's share of a decode step, merged exactly by
its log-sum-exp): the CPU flash op without a mask; the unfused fp32 path with a mask (a prefill
chunk's strided causal mask) and on other devices.

K/V are expanded on non-CPU devices because GQA support differs between CUDA kernels (the
expansion costs O(s) memory, the math fallback O(s^2)). A row whose keys are all masked gives 0
(unfused path; torch's SDPA on CPU does the same, CUDA kernels are not checked here).
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.bias import causal_lower_right

from megatron_mxn.attention.mask import NO_MASK, MaskSpec

BACKENDS = ("auto", "torch", "unfused")
_HAS_CPU_FLASH = hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu") and hasattr(
    torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward")
_warned_materialise = False


def attention(q: Tensor, k: Tensor, v: Tensor, *, scale: float, mask: MaskSpec = NO_MASK,
              dropout_p: float = 0.0, sink: Optional[Tensor] = None,
              backend: str = "auto") -> Tensor:
    """softmax(q k^T * scale + mask) v for q [b, hq, sq, d], k/v [b, hk, sk, d] -> [b, hq, sq, d].

    mask: which keys each row sees (mask.py; query row r at position mask.q_offset + r, keys at
    0 .. sk-1). Keys no row can see are sliced off first; a window that binds is run in query
    tiles, each against its own band of keys, so memory stays O(sq * (tile + window)).
    sink: fp32 [hq] attention-sink logits (megatron's softmax_type off-by-one / learnable): one
    more term exp(sink) in each row's softmax denominator, none in the output; differentiable.
    Query head t uses KV head t // (hq // hk). v may have another head dim than q and k
    (multi-latent attention): see _unequal_value_dim."""
    if v.dim() == 4 and q.dim() == 4 and v.shape[-1] != q.shape[-1]:
        return _unequal_value_dim(q, k, v, scale=scale, mask=mask, dropout_p=dropout_p,
                                  sink=sink, backend=backend)
    _check(q, k, v, mask, dropout_p, backend)
    sq, sk = q.shape[2], k.shape[2]
    lo, hi = mask.key_range(sq, sk)
    if (lo, hi) != (0, sk):  # keys that no row sees
        k, v, mask = k[:, :, lo:hi], v[:, :, lo:hi], mask.keys(lo, hi)
    mask = mask.simplified(sq, hi - lo)
    tile = _window_tile(mask, sq)
    if tile:
        return torch.cat([attention(q[:, :, a:a + tile], k, v, scale=scale,
                                    mask=mask.rows(a, a + tile), dropout_p=dropout_p,
                                    sink=sink, backend=backend)
                          for a in range(0, sq, tile)], dim=2)
    if sink is not None:  # one always-visible key whose score is the sink, value 0
        q, k, v, mask = _with_sink_key(q, k, v, mask, sink, scale)
        return _attend(q, k, v, scale, mask, dropout_p, backend)[..., :-1]
    return _attend(q, k, v, scale, mask, dropout_p, backend)


def _unequal_value_dim(q, k, v, **kwargs) -> Tensor:
    """attention() with a value head dim dv other than q/k's d: the kernels (and SDPA's CPU
    flash op) want one head dim, so the narrower side is zero-padded, which is exact: zero
    q/k dims add nothing to the scores, zero value dims give output dims that are cut off (and
    their gradients are dropped)."""
    d, dv = q.shape[-1], v.shape[-1]
    if dv < d:
        return attention(q, k, F.pad(v, (0, d - dv)), **kwargs)[..., :dv]
    return attention(F.pad(q, (0, dv - d)), F.pad(k, (0, dv - d)), v, **kwargs)


def _window_tile(mask: MaskSpec, sq: int) -> int:
    """Query rows per tile when a left window binds over many rows (0: one call)."""
    if mask.left is None:
        return 0
    tile = max(128, mask.left)
    return tile if sq > 2 * tile else 0


def _with_sink_key(q, k, v, mask: MaskSpec, sink: Tensor, scale: float):
    """Append a head dim and prepend a key: q' = [q, sink / scale], k' = [k, 0] and the sink key
    [0, .., 0, 1] (shared by every KV head, the value per query head rides on q), v' = [v, 0]
    and the sink value 0. Then q'k'^T * scale is the scores plus a sink column, and attention
    over the new key set is attention with the sink: exact, through any kernel and its
    autograd (d sink comes back through q's extra dim)."""
    b, hq, sq, d = q.shape
    hk, sk = k.shape[1], k.shape[2]
    extra = (sink.to(q.dtype) / scale).view(1, hq, 1, 1).expand(b, hq, sq, 1)
    q = torch.cat([q, extra], dim=-1)
    sink_key = torch.zeros(b, hk, 1, d + 1, dtype=k.dtype, device=k.device)
    sink_key[..., -1] = 1
    k = torch.cat([sink_key, F.pad(k, (0, 1))], dim=2)
    v = torch.cat([torch.zeros(b, hk, 1, d + 1, dtype=v.dtype, device=v.device),
                   F.pad(v, (0, 1))], dim=2)
    # the sink key (new column 0) is visible to every row: one more past position
    if not mask.windowed:
        padding = None if mask.padding is None else F.pad(mask.padding, (1, 0), value=False)
        return q, k, v, dataclasses.replace(mask, q_offset=mask.q_offset + 1, padding=padding)
    hidden = mask.tensor(sq, sk, q.device)  # a band does not shift: materialise it
    return q, k, v, MaskSpec(padding=F.pad(hidden, (1, 0), value=False))


def _attend(q, k, v, scale, mask: MaskSpec, dropout_p, backend) -> Tensor:
    """One kernel call on keys already cut to the rows' band (mask simplified)."""
    sq, sk = q.shape[2], k.shape[2]
    plain = mask.padding is None and not mask.windowed
    if backend == "unfused":
        return _unfused(q, k, v, scale, mask.tensor(sq, sk, q.device), dropout_p)
    if not plain:
        return _sdpa(q, k, v, scale, mask.tensor(sq, sk, q.device), False, dropout_p)
    if not mask.causal:
        return _sdpa(q, k, v, scale, None, False, dropout_p)
    q_offset = mask.q_offset  # causal, cut to [.., q_offset + sq): lower-right aligned
    if q_offset == 0:  # square diagonal block: is_causal is correctly aligned
        return _sdpa(q, k, v, scale, None, True, dropout_p)
    if q.device.type != "cpu":
        return _sdpa(q, k, v, scale, causal_lower_right(sq, sk), False, dropout_p)
    if _HAS_CPU_FLASH and dropout_p == 0:
        return _OffsetCausalFlash.apply(q, k, v, q_offset, scale)
    global _warned_materialise
    if dropout_p == 0 and not _warned_materialise:
        _warned_materialise = True
        warnings.warn("torch lacks the CPU flash op with log-sum-exp: causal chunks at an offset "
                      "materialise an s_q x s_k mask")
    return _sdpa(q, k, v, scale, mask.tensor(sq, sk, q.device), False, dropout_p)


def attention_with_lse(q: Tensor, k: Tensor, v: Tensor, *, scale: float,
                       mask: Optional[Tensor] = None, backend: str = "auto"):
    """(out, lse) of softmax(q k^T * scale + mask) v for q [b, hq, sq, d], k/v [b, hk, sk, d]:
    one rank's share of an attention split over keys, to be merged exactly by the log-sum-exps
    lse [b, hq, sq] (fp32; -inf and out = 0 for rows without a visible key). out is fp32.
    mask: bool, broadcastable to [b, hq, sq, sk], True = masked out. Without a mask on CPU it
    runs the flash op (no score matrix, no fp32 copy of K/V); otherwise the unfused path."""
    _check(q, k, v, NO_MASK, 0.0, backend)
    if (backend != "unfused" and mask is None and q.device.type == "cpu" and _HAS_CPU_FLASH
            and k.shape[2] > 0):  # (the op crashes on an empty key block)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, False, attn_mask=None, scale=scale)[:2]
        return out.float(), lse
    scores, v = _fp32_scores(q, k, v, scale, mask)
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse.clamp_min(torch.finfo(lse.dtype).min).unsqueeze(-1))
    return torch.matmul(probs, v), lse


def merge_partials(pieces: Tensor, lses: Tensor, sink: Optional[Tensor] = None) -> Tensor:
    """The exact merge of an attention split over keys: pieces [k, ..., d] (each share's
    attention_with_lse output, fp32) and their log-sum-exps lses [k, ...] -> sum_i exp(L_i - L)
    O_i with L = logsumexp_i L_i [..., d]. sink: attention-sink logits broadcastable to
    lses[0], one more term of the denominator (once, not once per share). A row no share sees
    a key of comes out 0."""
    total = torch.logsumexp(lses, dim=0)
    if sink is not None:
        total = torch.logaddexp(total, sink.float())
    weight = torch.exp(lses - total).nan_to_num(0.0)
    return (pieces * weight.unsqueeze(-1)).sum(dim=0)


def _check(q, k, v, mask, dropout_p, backend) -> None:
    """Refuse impossible requests up front (the private CPU op silently accepts hq % hk != 0)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape:
        raise ValueError(f"need q [b, hq, sq, d] and k, v [b, hk, sk, d]; got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    (b, hq, sq, d), (bk, hk, sk, dk) = q.shape, k.shape
    if b != bk or d != dk or hk == 0 or hq % hk:
        raise ValueError(f"q {tuple(q.shape)} and k/v {tuple(k.shape)} disagree: need the same "
                         f"batch and head dim, and hq a multiple of hk")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if mask.causal and not mask.windowed and not 0 <= mask.q_offset <= sk - sq:
        raise ValueError(f"causal chunk at q_offset={mask.q_offset} with sq={sq} needs "
                         f"0 <= q_offset and q_offset + sq <= sk={sk}")
    padding = mask.padding
    if padding is not None and (
            padding.dtype != torch.bool or padding.dim() != 4
            or padding.shape[0] not in (1, b) or padding.shape[1] not in (1, hq)
            or tuple(padding.shape[2:]) != (sq, sk)):
        raise ValueError(f"padding_mask must be bool [b or 1, 1 or hq, {sq}, {sk}], got "
                         f"{padding.dtype} {tuple(padding.shape)}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")


def _sdpa(q, k, v, scale, mask, is_causal, dropout_p) -> Tensor:
    """torch's SDPA; `mask` is bool (True = masked out) or a CausalBias."""
    gqa = q.shape[1] != k.shape[1]
    if gqa and q.device.type != "cpu":
        k, v, gqa = _expand_kv(k, q.shape[1]), _expand_kv(v, q.shape[1]), False
    if isinstance(mask, Tensor):
        mask = ~mask  # SDPA's bool masks mean True = attend
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p,
                                          is_causal=is_causal, scale=scale, enable_gqa=gqa)


def _expand_kv(x: Tensor, hq: int) -> Tensor:
    """[b, hk, s, d] -> [b, hq, s, d], query head t reading KV head t // (hq // hk)."""
    b, hk, s, d = x.shape
    return x[:, :, None].expand(b, hk, hq // hk, s, d).reshape(b, hq, s, d)


def _fp32_scores(q, k, v, scale, mask):
    """(masked fp32 scores [b, hq, sq, sk], fp32 V expanded to hq heads) of the unfused paths."""
    k, v = _expand_kv(k, q.shape[1]).float(), _expand_kv(v, q.shape[1]).float()
    scores = torch.matmul(q.float(), k.transpose(-1, -2)) * scale
    if mask is not None:
        scores = scores.masked_fill(mask, float("-inf"))
    return scores, v


def _unfused(q, k, v, scale, mask, dropout_p) -> Tensor:
    """Reference path: fp32 scores, masked softmax, optional dropout; builds sq x sk."""
    scores, v = _fp32_scores(q, k, v, scale, mask)
    probs = torch.softmax(scores, dim=-1)
    if mask is not None:
        probs = probs.nan_to_num(0.0)  # fully masked rows give 0, as torch's SDPA
    if dropout_p > 0:
        probs = F.dropout(probs, dropout_p)
    return torch.matmul(probs, v).to(q.dtype)


class _OffsetCausalFlash(torch.autograd.Function):
    """Causal attention of a chunk at q_offset > 0 over keys [0, q_offset + sq) with the CPU flash
    op, which also returns the log-sum-exp: the past block [0, q_offset) unmasked, the square
    diagonal block with is_causal, merged exactly (L = logaddexp(L1, L2), O = sum exp(Li - L) Oi).
    Backward runs the flash backward per block with the MERGED O and L (so D = rowsum(dO * O) and
    P = exp(S - L) are the full softmax's, as in ring attention); dq sums, dk/dv concatenate.
    The op handles GQA itself (dk/dv come back with hk heads); it crashes (SIGFPE) on empty blocks,
    which this path never passes."""

    @staticmethod
    def forward(ctx, q, k, v, q_offset, scale):
        outs, lses = [], []
        for keys, is_causal in _blocks(q_offset):
            o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                q, k[:, :, keys], v[:, :, keys], 0.0, is_causal, attn_mask=None, scale=scale)
            outs.append(o)
            lses.append(lse)  # [b, hq, sq], fp32 also for bf16 inputs
        lse = torch.logaddexp(*lses)
        out = sum(torch.exp(l - lse).unsqueeze(-1) * o for o, l in zip(outs, lses)).to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.q_offset, ctx.scale = q_offset, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dks, dvs = 0, [], []
        for keys, is_causal in _blocks(ctx.q_offset):
            gq, gk, gv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                dout, q, k[:, :, keys], v[:, :, keys], out, lse, 0.0, is_causal,
                attn_mask=None, scale=ctx.scale)
            dq = dq + gq.float()
            dks.append(gk)
            dvs.append(gv)
        return dq.to(q.dtype), torch.cat(dks, dim=2), torch.cat(dvs, dim=2), None, None


def _blocks(q_offset: int):
    """(key slice, is_causal) of the past block and the square diagonal block."""
    return ((slice(0, q_offset), False), (slice(q_offset, None), True))
