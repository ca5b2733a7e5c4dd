"""Fused attention for the sequence-split core (the sequence-split core of the issue tracker; docs/design.md).

A rank attends a few query rows, at absolute positions q_offset .. q_offset + sq - 1, to keys at
positions 0 .. sk - 1 with the full head dim. With a causal mask or none, no sq x sk tensor is
built: memory stays O(s). A causal chunk only sees keys [0, q_offset + sq), so the rest are sliced
off first.

Which path runs (backend "torch"; "auto" is the same: torch's SDPA serves every accepted case):

  case                      CPU                                    CUDA / other devices
  no mask                   SDPA flash (enable_gqa)                SDPA, K/V expanded to hq heads
  causal, q_offset == 0     SDPA flash, is_causal (square block)   SDPA is_causal, K/V expanded
  causal, q_offset > 0      _OffsetCausalFlash: private CPU flash  SDPA + causal_lower_right
                            op on past + diagonal block, LSE merge (flash/mem-efficient, no mask)
    private ops missing     SDPA + materialised mask, warns once   -
  padding_mask (+ causal)   SDPA with the combined bool mask       same (materialising unavoidable)
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

import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.bias import causal_lower_right

BACKENDS = ("auto", "torch", "unfused")
_HAS_CPU_FLASH = hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu") and hasattr(
    torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward")
_warned_materialise = False


def attention(q: Tensor, k: Tensor, v: Tensor, *, scale: float, causal: bool, q_offset: int = 0,
              padding_mask: Optional[Tensor] = None, dropout_p: float = 0.0,
              backend: str = "auto") -> Tensor:
    """softmax(q k^T * scale + mask) v for q [b, hq, sq, d], k/v [b, hk, sk, d] -> [b, hq, sq, d].

    causal: row r (absolute position q_offset + r) sees keys 0 .. q_offset + r. padding_mask: bool
    [b, 1 or hq, sq, sk], True = masked out (megatron's convention). Query head t uses KV head
    t // (hq // hk)."""
    _check(q, k, v, causal, q_offset, padding_mask, dropout_p, backend)
    sq = q.shape[2]
    if causal:  # keys past the chunk's last position are never seen
        end = q_offset + sq
        k, v = k[:, :, :end], v[:, :, :end]
        padding_mask = None if padding_mask is None else padding_mask[..., :end]
    if backend == "unfused":
        mask = _combined_mask(q, k, causal, q_offset, padding_mask)
        return _unfused(q, k, v, scale, mask, dropout_p)
    if padding_mask is not None:
        mask = _combined_mask(q, k, causal, q_offset, padding_mask)
        return _sdpa(q, k, v, scale, mask, False, dropout_p)
    if not causal or q_offset == 0:  # square diagonal block: is_causal is correctly aligned
        return _sdpa(q, k, v, scale, None, causal, dropout_p)
    if q.device.type != "cpu":
        return _sdpa(q, k, v, scale, causal_lower_right(sq, k.shape[2]), False, dropout_p)
    if _HAS_CPU_FLASH and dropout_p == 0:
        return _OffsetCausalFlash.apply(q, k, v, q_offset, scale)
    global _warned_materialise
    if dropout_p == 0 and not _warned_materialise:
        _warned_materialise = True
        warnings.warn("torch lacks the CPU flash op with log-sum-exp: causal chunks at an offset "
                      "materialise an s_q x s_k mask")
    return _sdpa(q, k, v, scale, _combined_mask(q, k, True, q_offset, None), False, dropout_p)


def attention_with_lse(q: Tensor, k: Tensor, v: Tensor, *, scale: float,
                       mask: Optional[Tensor] = None, backend: str = "auto"):
    """(out, lse) of softmax(q k^T * scale + mask) v for q [b, hq, sq, d], k/v [b, hk, sk, d]:
    one rank's share of an attention split over keys, to be merged exactly by the log-sum-exps
    lse [b, hq, sq] (fp32; -inf and out = 0 for rows without a visible key). out is fp32.
    mask: bool, broadcastable to [b, hq, sq, sk], True = masked out. Without a mask on CPU it
    runs the flash op (no score matrix, no fp32 copy of K/V); otherwise the unfused path."""
    _check(q, k, v, False, 0, None, 0.0, backend)
    if (backend != "unfused" and mask is None and q.device.type == "cpu" and _HAS_CPU_FLASH
            and k.shape[2] > 0):  # (the op crashes on an empty key block)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, False, attn_mask=None, scale=scale)[:2]
        return out.float(), lse
    scores, v = _fp32_scores(q, k, v, scale, mask)
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse.clamp_min(torch.finfo(lse.dtype).min).unsqueeze(-1))
    return torch.matmul(probs, v), lse


def _check(q, k, v, causal, q_offset, padding_mask, dropout_p, backend) -> None:
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
    if causal and not 0 <= q_offset <= sk - sq:
        raise ValueError(f"causal chunk at q_offset={q_offset} with sq={sq} needs 0 <= q_offset "
                         f"and q_offset + sq <= sk={sk}")
    if padding_mask is not None and (
            padding_mask.dtype != torch.bool or padding_mask.dim() != 4
            or padding_mask.shape[0] not in (1, b) or padding_mask.shape[1] not in (1, hq)
            or tuple(padding_mask.shape[2:]) != (sq, sk)):
        raise ValueError(f"padding_mask must be bool [b or 1, 1 or hq, {sq}, {sk}], got "
                         f"{padding_mask.dtype} {tuple(padding_mask.shape)}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")


def _combined_mask(q, k, causal, q_offset, padding_mask) -> Optional[Tensor]:
    """Bool mask, True = masked out: the padding mask, or-ed with the offset causal mask."""
    mask = padding_mask
    if causal:
        rows = torch.arange(q.shape[2], device=q.device) + q_offset
        future = torch.arange(k.shape[2], device=q.device)[None, :] > rows[:, None]
        mask = future if mask is None else mask | future
    return mask


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
