"""q/k normalisation over a head's full dim when each rank holds d/m of its dims."""

from __future__ import annotations

from typing import List

import torch
import torch.distributed as dist
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_mxn.attention.collectives import all_reduce_sum


class SlicedHeadNorm(torch.nn.Module):
    """LayerNorm, RMSNorm or L2Norm of every head vector, computed from dim slices.

    The statistics are sums over all d dims, so the per-slice partial sums are all-reduced over
    the dim-slice group (in fp32). The affine weight (and bias) keep their full [d] shape and
    megatron's names on every rank; only the slice's entries are used. megatron's
    finalize_model_grads sums q_layernorm/k_layernorm grads over the TP group, which adds up
    exactly the per-slice, per-head-group contributions.
    """

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float,
                 dims: List[int], group: dist.ProcessGroup, kind: str):
        super().__init__()
        if kind not in ("LayerNorm", "RMSNorm", "L2Norm"):
            raise ValueError(f"q/k norm {kind!r} is not supported on the grid "
                             "(LayerNorm, RMSNorm and L2Norm are)")
        self.kind, self.eps, self.group, self.hidden_size = kind, eps, group, hidden_size
        self.zero_centered_gamma = config.layernorm_zero_centered_gamma
        self.register_buffer("dims", torch.tensor(dims, dtype=torch.long), persistent=False)
        if kind != "L2Norm":
            init = 0.0 if self.zero_centered_gamma else 1.0
            self.weight = torch.nn.Parameter(
                torch.full((hidden_size,), init, dtype=config.params_dtype))
        if kind == "LayerNorm":
            self.bias = torch.nn.Parameter(torch.zeros(hidden_size, dtype=config.params_dtype))

    def _sum(self, x: torch.Tensor) -> torch.Tensor:
        return all_reduce_sum(x.sum(-1, keepdim=True), self.group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        if self.kind == "LayerNorm":
            xf = xf - self._sum(xf) / self.hidden_size
        y = xf * torch.rsqrt(self._sum(xf * xf) / self.hidden_size + self.eps)
        if self.kind != "L2Norm":
            w = self.weight.index_select(0, self.dims).float()
            y = y * (w + 1.0 if self.zero_centered_gamma else w)
        if self.kind == "LayerNorm":
            y = y + self.bias.index_select(0, self.dims).float()
        return y.to(x.dtype)
