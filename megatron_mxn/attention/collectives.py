"""Collectives used by the grid attention: autograd-aware ones (training), and the plain
all-to-alls that bring the position-sharded caches' partial outputs to the ranks that combine
them (decode: the dim-slice cache's and MLA's latent cache's)."""

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


class _AllToAll(torch.autograd.Function):
    """Exchange rows (dim 0) over `group`: block r of the input goes to rank r, and block r of
    the output comes from rank r, with the given row counts. Backward: the reverse exchange."""

    @staticmethod
    def forward(ctx, x, group, send_rows, recv_rows):
        ctx.group, ctx.send_rows, ctx.recv_rows = group, send_rows, recv_rows
        return _exchange(x, group, send_rows, recv_rows)

    @staticmethod
    def backward(ctx, grad):
        return _exchange(grad, ctx.group, ctx.recv_rows, ctx.send_rows), None, None, None


def _exchange(x, group, send_rows, recv_rows):
    x = x.contiguous()
    out = x.new_empty((sum(recv_rows), *x.shape[1:]))
    dist.all_to_all_single(out, x, output_split_sizes=list(recv_rows),
                           input_split_sizes=list(send_rows), group=group)
    return out


def all_to_all_rows(x: torch.Tensor, group: dist.ProcessGroup, send_rows, recv_rows):
    """Differentiable all-to-all of row blocks (`send_rows[r]` rows of x go to rank r;
    `recv_rows[r]` rows come from rank r, in rank order)."""
    return _AllToAll.apply(x, group, tuple(send_rows), tuple(recv_rows))


@torch.no_grad()
def exchange_dim_slices_with_lse(partial: torch.Tensor, lse: torch.Tensor,
                                 group: dist.ProcessGroup):
    """One all-to-all over the m ranks of `group` (decode: no autograd): each rank's partial
    output `partial` [b, h, s, d] and its log-sum-exp `lse` [b, h, s] -> for this rank k, dims k
    of every rank's partial [m, b, h, s, d/m] and every rank's lse [m, b, h, s] (fp32, rank
    order). Rank j sends rank k one fp32 block [b, h, s, d/m + 1]: its dims k and its lse."""
    m = dist.get_world_size(group)
    b, h, s, d = partial.shape
    dims = partial.float().reshape(b, h, s, m, d // m).permute(3, 0, 1, 2, 4)
    send = torch.cat([dims, lse.float().expand(m, b, h, s).unsqueeze(-1)], dim=-1).contiguous()
    received = torch.empty_like(send)
    dist.all_to_all_single(received, send, group=group)
    return received[..., :-1], received[..., -1]


@torch.no_grad()
def exchange_head_groups_with_lse(partial: torch.Tensor, lse: torch.Tensor, group,
                                  head_groups: int):
    """One all-to-all over the n*m ranks: every rank's partial latent output [b, h, sq, L]
    and log-sum-exp [b, h, sq] -> for this rank's head group, every rank's pieces
    [n*m, b, h/n, sq, L] and log-sum-exps [n*m, b, h/n, sq] (fp32, rank order). Rank t sends
    rank (i', j') one fp32 block [b, h/n, sq, L + 1]: head group i''s heads and their lse."""
    world = dist.get_world_size(group)
    m = world // head_groups
    b, h, sq, latent = partial.shape
    block = torch.cat([partial.float(), lse.float().unsqueeze(-1)], dim=-1)
    block = block.view(b, head_groups, h // head_groups, sq, latent + 1).transpose(0, 1)
    send = block.repeat_interleave(m, dim=0).contiguous()  # [n*m, b, h/n, sq, L + 1]
    received = torch.empty_like(send)
    dist.all_to_all_single(received, send, group=group)
    return received[..., :-1], received[..., -1]
