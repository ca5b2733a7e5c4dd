"""One description of an attention mask, taken by every schedule, kernel and KV cache.

Query row r sits at position `q_offset + r`, key column c at position c (a KV cache sharded by
position passes its keys' positions). Key kp is visible to query qp iff

    (not causal or kp <= qp) and (left is None or kp >= qp - left)
    and (right is None or kp <= qp + right) and not padding[..., r, c]

megatron-core's sliding window (`window_size=(left, right)`, `get_sliding_window_causal_mask`:
query i of sq sees key j iff i + skv - sq - left <= j <= i + skv - sq + right) is the band with
q_offset = skv - sq; when a layer has a window megatron uses the band *instead of* its causal or
padding mask, and `MaskSpec.of` does the same. A window side of -1 is unbounded (TransformerConfig's
"infinite window size"). Kernels slice keys to `key_range` before they run, so a windowed chunk
costs O(rows * window), and build a tensor (`tensor`) only where no kernel takes the
description as it is.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import Tensor


@dataclass(frozen=True)
class MaskSpec:
    causal: bool = False
    q_offset: int = 0  # position of query row 0 (keys: column c at position c)
    left: Optional[int] = None  # window: keys at most `left` positions back (None: unbounded)
    right: Optional[int] = None  # window: keys at most `right` positions ahead
    padding: Optional[Tensor] = None  # bool [b or 1, 1 or heads, sq, sk], True = masked out

    @staticmethod
    def of(causal: bool, q_offset: int = 0, window: Optional[Tuple[int, int]] = None,
           padding: Optional[Tensor] = None) -> "MaskSpec":
        """The mask of a layer call, megatron's way: a window replaces causal and padding."""
        if window is None:
            return MaskSpec(causal, q_offset, padding=padding)
        left, right = (None if w is None or w < 0 else int(w) for w in window)
        if right == 0:  # the band ends at the query: causal
            return MaskSpec(True, q_offset, left, None)
        return MaskSpec(False, q_offset, left, right)

    @property
    def windowed(self) -> bool:
        return self.left is not None or self.right is not None

    def rows(self, start: int, stop: int) -> "MaskSpec":
        """The mask of query rows start .. stop-1."""
        padding = None if self.padding is None else self.padding[..., start:stop, :]
        return dataclasses.replace(self, q_offset=self.q_offset + start, padding=padding)

    def keys(self, start: int, stop: int) -> "MaskSpec":
        """The mask against key columns start .. stop-1 (renumbered from 0)."""
        padding = None if self.padding is None else self.padding[..., start:stop]
        return dataclasses.replace(self, q_offset=self.q_offset - start, padding=padding)

    def key_range(self, sq: int, sk: int) -> Tuple[int, int]:
        """[lo, hi): the key columns that some of the sq rows may see (others never are)."""
        first, last = self.q_offset, self.q_offset + sq - 1
        lo = 0 if self.left is None else max(0, first - self.left)
        hi = sk
        if self.causal:
            hi = min(hi, last + 1)
        if self.right is not None:
            hi = min(hi, last + self.right + 1)
        lo = min(lo, sk)
        return lo, max(lo, hi)

    def simplified(self, sq: int, sk: int) -> "MaskSpec":
        """The same mask without the parts that hide nothing among sk keys."""
        first, last = self.q_offset, self.q_offset + sq - 1
        causal = self.causal and first < sk - 1  # row 0 already sees every key otherwise
        left = None if self.left is None or last - self.left <= 0 else self.left
        right = None if self.right is None or first + self.right >= sk - 1 else self.right
        if causal and right is not None:  # (right > 0) causal hides more
            right = None
        return dataclasses.replace(self, causal=causal, left=left, right=right)

    def hides_nothing(self, sq: int, sk: int) -> bool:
        m = self.simplified(sq, sk)
        return not (m.causal or m.windowed or m.padding is not None)

    def tensor(self, sq: int, sk: int, device=None,
               key_positions: Optional[Tensor] = None) -> Optional[Tensor]:
        """bool [.., sq, sk], True = masked out (None: nothing is). key_positions: the
        positions of the sk keys (default 0 .. sk-1)."""
        m = self.simplified(sq, sk) if key_positions is None else self
        if key_positions is None and m.hides_nothing(sq, sk):
            return None
        qp = torch.arange(sq, device=device)[:, None] + m.q_offset
        kp = (torch.arange(sk, device=device) if key_positions is None
              else key_positions.to(device))[None, :]
        hidden = torch.zeros(sq, sk, dtype=torch.bool, device=device)
        if m.causal:
            hidden |= kp > qp
        if m.left is not None:
            hidden |= kp < qp - m.left
        if m.right is not None:
            hidden |= kp > qp + m.right
        hidden = hidden.view(1, 1, sq, sk)
        if m.padding is not None:
            hidden = hidden | m.padding
        return hidden


NO_MASK = MaskSpec()
