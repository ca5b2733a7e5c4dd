"""Which heads, dims, weight rows and columns each rank (i, j) of an n x m grid owns.

Pure arithmetic, no process groups: every rank can compute every other rank's share, which is
what checkpoint sharding needs. Notation follows docs/design.md: h query heads, g KV heads, head dim
d, n head groups, m dim slices, r rotary dims (0 = no RoPE).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property, reduce
from math import gcd
from typing import List


class MxnConfigError(ValueError):
    """A model or layout that the head-group x dim-slice grid cannot run; names the rule."""


@dataclass(frozen=True)
class GridLayout:
    """The grid's partition of one attention layer. Validates itself on construction."""

    head_groups: int  # n
    dim_slices: int  # m
    num_heads: int  # h
    num_kv_heads: int  # g
    head_dim: int  # d
    rotary_dim: int = 0  # r: leading head dims rotated by RoPE; 0 when RoPE is not used
    rotary_interleaved: bool = False

    def __post_init__(self):
        n, m, h, g, d, r = (self.head_groups, self.dim_slices, self.num_heads,
                            self.num_kv_heads, self.head_dim, self.rotary_dim)
        if n < 1 or m < 1:
            raise MxnConfigError(f"head groups n={n} and dim slices m={m} must be >= 1")
        if h % n:
            raise MxnConfigError(
                f"num_attention_heads ({h}) must be divisible by the head groups n ({n})")
        if g % n and n % g:
            raise MxnConfigError(
                f"num_query_groups ({g}) and head groups n ({n}) must divide one another "
                f"(KV heads are split over head groups, or shared by n/g of them)")
        if d % m:
            raise MxnConfigError(f"head dim kv_channels ({d}) must be divisible by the dim "
                                 f"slices m ({m})")
        if r:
            if r > d:
                raise MxnConfigError(f"rotary dims ({r}) exceed the head dim ({d})")
            if r % (2 * m):
                raise MxnConfigError(
                    f"rotary dims ({r}) must be divisible by 2*m ({2 * m}) so that every dim "
                    f"slice holds whole RoPE pairs")
        if n > g and (2 * d // m) % (n // g):
            raise MxnConfigError(
                f"with more head groups than KV heads (n={n} > g={g}) the K/V rows of a dim "
                f"slice (2*d/m = {2 * d // m}) must split evenly over the n/g = {n // g} head "
                f"groups that share a KV head")

    # ------------------------------------------------------------------ sizes per rank
    @property
    def world(self) -> int:
        """Ranks in one grid (= the TP size)."""
        return self.head_groups * self.dim_slices

    @property
    def heads_per_rank(self) -> int:
        return self.num_heads // self.head_groups

    @property
    def kv_heads_per_rank(self) -> int:
        return max(self.num_kv_heads // self.head_groups, 1)

    @property
    def slice_dim(self) -> int:
        return self.head_dim // self.dim_slices

    @property
    def kv_shared(self) -> bool:
        """True when n > g: n/g head groups share one KV head, whose K/V rows they split."""
        return self.head_groups > self.num_kv_heads

    @property
    def kv_share(self) -> int:
        """Head groups sharing one KV head (n/g when n > g, else 1): its K/V replication
        factor in the KV cache."""
        return max(self.head_groups // self.num_kv_heads, 1)

    def kv_head_of(self, i: int) -> int:
        """The KV head used by head group i when n > g."""
        return i // self.kv_share

    # ------------------------------------------------------------------ index lists
    def dims(self, j: int) -> List[int]:
        """Head dims held by slice j, in local order. RoPE pairs stay together: for
        non-interleaved RoPE the slice takes matching blocks of both rotary halves, so that
        megatron's rotate-half applied to the local dims pairs the right elements."""
        m, r, d = self.dim_slices, self.rotary_dim, self.head_dim
        out: List[int] = []
        if r and not self.rotary_interleaved:
            w = r // (2 * m)
            out += list(range(j * w, (j + 1) * w)) + list(range(r // 2 + j * w, r // 2 + (j + 1) * w))
        elif r:
            w = r // m
            out += list(range(j * w, (j + 1) * w))
        w = (d - r) // m
        out += list(range(r + j * w, r + (j + 1) * w))
        return out

    def rotary_dims(self, j: int) -> List[int]:
        """Indices into the rotary frequency tensor's last dim for slice j (its leading
        local dims are the rotary ones)."""
        return [x for x in self.dims(j) if x < self.rotary_dim]

    def qkv_rows(self, i: int, j: int) -> List[int]:
        """Rows of megatron's fused linear_qkv weight held by rank (i, j), in local order.

        Global rows are [g KV groups][h/g query heads, key, value][d dims]. When n <= g a rank
        holds whole KV groups restricted to its dims. When n > g it holds its own query heads
        and piece k of the K/V rows of slice j of its KV head c (head group i = c*n/g + k):
        the n/g head groups sharing that KV head all-gather the pieces (the KV-share group).
        """
        h, g, d = self.num_heads, self.num_kv_heads, self.head_dim
        slots = h // g + 2
        dims = self.dims(j)

        def rows(group: int, slot: int) -> List[int]:
            return [(group * slots + slot) * d + x for x in dims]

        if not self.kv_shared:
            per = g // self.head_groups
            return [row for c in range(i * per, (i + 1) * per) for s in range(slots)
                    for row in rows(c, s)]
        share = self.kv_share
        c, k = self.kv_head_of(i), i % share
        hq = self.heads_per_rank
        q = [row for t in range(k * hq, (k + 1) * hq) for row in rows(c, t)]
        kv = rows(c, slots - 2) + rows(c, slots - 1)
        piece = len(kv) // share
        return q + kv[k * piece:(k + 1) * piece]

    def proj_columns(self, i: int, j: int) -> List[int]:
        """Input columns of linear_proj (viewed as [D, h, d]) held by rank (i, j)."""
        d, hq = self.head_dim, self.heads_per_rank
        return [t * d + x for t in range(i * hq, (i + 1) * hq) for x in self.dims(j)]

    # ------------------------------------------------------------------ checkpoint chunks
    @cached_property
    def qkv_chunk(self) -> int:
        """Largest chunk size in which every rank's qkv rows are aligned contiguous runs."""
        return _aligned_chunk([self.qkv_rows(i, j) for i, j in self.ranks()])

    @cached_property
    def proj_chunk(self) -> int:
        return _aligned_chunk([self.proj_columns(i, j) for i, j in self.ranks()])

    def ranks(self):
        """All (i, j) in TP-rank order: tp_rank = i*m + j."""
        return [(i, j) for i in range(self.head_groups) for j in range(self.dim_slices)]


def _aligned_chunk(index_lists: List[List[int]]) -> int:
    """gcd of every run start and run length: chunks of that size are contiguous and aligned
    in every list, so each can be described as one regular checkpoint shard."""
    values = []
    for idx in index_lists:
        start = 0
        for k in range(1, len(idx) + 1):
            if k == len(idx) or idx[k] != idx[k - 1] + 1:
                values += [idx[start], k - start]
                start = k
    return reduce(gcd, values)
