"""Which rows and columns of multi-latent attention's (MLA's) per-head projections each rank
(i, j) of an n x m grid owns (docs/design.md, "Multi-latent attention").

MLA's heads have three parts: a query/key part without position (`qk_head_dim`, a), a RoPE part
(`qk_pos_emb_head_dim`, r) whose key half is one vector shared by all heads (it comes from the
replicated down-projection), and a value part (`v_head_dim`, v). Rank (i, j) holds the h/n heads
of head group i, and of each head dims j of every part: a/m query/key dims, r/m RoPE dims (whole
rotary pairs: megatron's MLA RoPE pairs input dims 2k and 2k+1, so slice j's pairs are the
contiguous input dims [j r/m, (j+1) r/m)) and v/m value dims. Pure arithmetic, like layout.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import List

from megatron_mxn.grid.layout import MxnConfigError, _aligned_chunk


@dataclass(frozen=True)
class MlaLayout:
    """The grid's partition of one MLA layer. Validates itself on construction."""

    head_groups: int  # n
    dim_slices: int  # m
    num_heads: int  # h
    qk_head_dim: int  # a: query/key dims without position
    rope_dim: int  # r: qk_pos_emb_head_dim
    v_head_dim: int  # v

    def __post_init__(self):
        n, m, h = self.head_groups, self.dim_slices, self.num_heads
        if n < 1 or m < 1:
            raise MxnConfigError(f"head groups n={n} and dim slices m={m} must be >= 1")
        if h % n:
            raise MxnConfigError(
                f"num_attention_heads ({h}) must be divisible by the head groups n ({n})")
        for name, dim in (("qk_head_dim", self.qk_head_dim), ("v_head_dim", self.v_head_dim)):
            if dim % m:
                raise MxnConfigError(f"MLA's {name} ({dim}) must be divisible by the dim "
                                     f"slices m ({m})")
        if self.rope_dim % (2 * m):
            raise MxnConfigError(
                f"MLA's qk_pos_emb_head_dim ({self.rope_dim}) must be divisible by 2*m "
                f"({2 * m}) so that every dim slice holds whole RoPE pairs")

    # ------------------------------------------------------------------ sizes per rank
    @property
    def world(self) -> int:
        return self.head_groups * self.dim_slices

    @property
    def heads_per_rank(self) -> int:
        return self.num_heads // self.head_groups

    @property
    def nope_slice(self) -> int:
        return self.qk_head_dim // self.dim_slices

    @property
    def rope_slice(self) -> int:
        return self.rope_dim // self.dim_slices

    @property
    def v_slice(self) -> int:
        return self.v_head_dim // self.dim_slices

    @property
    def q_head_dim(self) -> int:
        return self.qk_head_dim + self.rope_dim

    # ------------------------------------------------------------------ index lists
    def _part(self, size: int, j: int, offset: int = 0) -> List[int]:
        w = size // self.dim_slices
        return list(range(offset + j * w, offset + (j + 1) * w))

    def rope_dims(self, j: int) -> List[int]:
        """Slice j's dims of the RoPE part (the key's from the down-projection too)."""
        return self._part(self.rope_dim, j)

    def rotary_freq_index(self, j: int) -> List[int]:
        """Indices into megatron's [r] frequency tensor (cat(f, f)) for slice j: its rotary
        pairs k in [j r/(2m), (j+1) r/(2m)) take frequency k from both halves."""
        w, half = self.rope_dim // (2 * self.dim_slices), self.rope_dim // 2
        return list(range(j * w, (j + 1) * w)) + list(range(half + j * w, half + (j + 1) * w))

    def q_rows(self, i: int, j: int) -> List[int]:
        """Rows of linear_q_proj / linear_q_up_proj ([h][a + r]) held by rank (i, j): per head
        of group i, its no-position dims j, then its RoPE dims j."""
        a, d = self.qk_head_dim, self.q_head_dim
        dims = self._part(a, j) + self._part(self.rope_dim, j, a)
        return [t * d + x for t in self._heads(i) for x in dims]

    def kv_up_rows(self, i: int, j: int) -> List[int]:
        """Rows of linear_kv_up_proj ([h][a + v]) held by rank (i, j): per head of group i, its
        key dims j, then its value dims j."""
        a, d = self.qk_head_dim, self.qk_head_dim + self.v_head_dim
        dims = self._part(a, j) + self._part(self.v_head_dim, j, a)
        return [t * d + x for t in self._heads(i) for x in dims]

    def proj_columns(self, i: int, j: int) -> List[int]:
        """Input columns of linear_proj ([D][h][v]) held by rank (i, j)."""
        v = self.v_head_dim
        return [t * v + x for t in self._heads(i) for x in self._part(v, j)]

    def _heads(self, i: int) -> range:
        hq = self.heads_per_rank
        return range(i * hq, (i + 1) * hq)

    # ------------------------------------------------------------------ checkpoint chunks
    @cached_property
    def q_chunk(self) -> int:
        return _aligned_chunk([self.q_rows(i, j) for i, j in self.ranks()])

    @cached_property
    def kv_up_chunk(self) -> int:
        return _aligned_chunk([self.kv_up_rows(i, j) for i, j in self.ranks()])

    @cached_property
    def proj_chunk(self) -> int:
        return _aligned_chunk([self.proj_columns(i, j) for i, j in self.ranks()])

    def ranks(self):
        """All (i, j) in TP-rank order: tp_rank = i*m + j."""
        return [(i, j) for i in range(self.head_groups) for j in range(self.dim_slices)]
