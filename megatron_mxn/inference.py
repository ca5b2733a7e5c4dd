"""Greedy generation with megatron-core's static KV cache (any TP or grid layout, PP = 1)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, List, Optional

import torch
from megatron.core import tensor_parallel
from megatron.core.inference.contexts import StaticInferenceContext


@dataclass
class Generation:
    tokens: torch.Tensor  # [b, new_tokens]
    step_logits: List[torch.Tensor] = field(default_factory=list)  # [b, V] per step (fp32)
    kv_cache_bytes: int = 0  # this rank's KV cache, all layers


def kv_cache_bytes(context: StaticInferenceContext) -> int:
    """Bytes of the K and V buffers this rank allocated in a static inference context."""
    return sum(t.numel() * t.element_size()
               for kv in context.key_value_memory_dict.values() for t in kv)


@torch.no_grad()
def greedy_generate(model, prompt: torch.Tensor, new_tokens: int, tp_group,
                    keep_logits: bool = True,
                    before_step: Optional[Callable[[int], None]] = None) -> Generation:
    """Prefill `prompt` [b, s] then decode greedily: step 0 is the prefill, steps 1.. decode one
    token each with the KV cache, `new_tokens` tokens in all. Logits are gathered over the TP
    group so that every rank picks the same token. `before_step(step)` runs before each
    forward (e.g. to switch communication counting on for decode steps)."""
    b, s = prompt.shape
    context = StaticInferenceContext(b, s + new_tokens)
    out = Generation(tokens=torch.empty(b, 0, dtype=torch.long))
    tokens, positions = prompt, torch.arange(s).expand(b, s)
    for step in range(new_tokens):
        if step == 1:
            context.enable_decode_mode()
        if before_step is not None:
            before_step(step)
        logits = model(tokens, positions, None, inference_context=context)
        logits = tensor_parallel.gather_from_tensor_model_parallel_region(
            logits[:, -1].contiguous(), group=tp_group).float()
        nxt = logits.argmax(-1, keepdim=True)
        if keep_logits:
            out.step_logits.append(logits)
        out.tokens = torch.cat([out.tokens, nxt], dim=1)
        context.sequence_len_offset += tokens.size(1)
        positions = torch.full((b, 1), context.sequence_len_offset, dtype=torch.long)
        tokens = nxt
    out.kv_cache_bytes = kv_cache_bytes(context)
    return out
