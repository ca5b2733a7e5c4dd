"""Autograd-aware collectives used by the grid attention."""

from __future__ import annotations

import torch
import torch.distributed as dist


class _AllReduceSum(torch.autograd.Function):
    """Sum over `group` in forward, and sum the gradients over `group` in backward.

    The partial scores of the m dim-slice ranks add up to the full scores, which every one of
    them then uses with its own V slice: d(loss)/d(partial_j) is the sum over the group of the
    gradients each rank computes for the full scores. megatron's reduce_from_tensor_model_
    parallel_region has an identity backward, which is right only when the downstream use is
    replicated; here it is not.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        dist.all_reduce(x, group=group)
        ctx.mark_dirty(x)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def all_reduce_sum(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Sum of `x` over `group`, differentiable (backward: sum of gradients over `group`).
    Consumes `x` (reduced in place when it is contiguous)."""
    if group is None or dist.get_world_size(group) == 1:
        return x
    return _AllReduceSum.apply(x.contiguous(), group)
