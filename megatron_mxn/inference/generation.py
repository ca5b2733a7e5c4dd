"""Batched generation with megatron-core's static KV cache, under any TP/grid x PP layout.

The batch is split into micro-batches that flow through the pipeline stages (stage s works on
micro-batch i while stage s+1 works on micro-batch i-1); the last stage picks each micro-batch's
next token from the TP-gathered fp32 logits (greedy, or sampled with megatron's sampling: see
`Sampler`) and sends it back to the first stage. With PP = 1 and one micro-batch this is the
plain prefill + decode loop.
"""

from __future__ import annotations

import resource
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional

import torch
import torch.distributed as dist
from megatron.core import tensor_parallel
from megatron.core.inference.contexts import StaticInferenceContext
from megatron.core.inference.sampling.torch_sampling import TorchSampling
from megatron.core.inference.sampling_params import SamplingParams
from megatron.core.utils import get_attr_wrapped_model

from megatron_mxn.attention.position_cache import kv_cache_used, request_kv_cache
from megatron_mxn.attention.schedules import DIMS


@dataclass
class Generation:
    """What one generate() call produced on this rank (tokens and logits on the last stage)."""

    tokens: torch.Tensor  # [b, new_tokens] on the last pipeline stage, else empty
    step_logits: List[torch.Tensor] = field(default_factory=list)  # [b, V] fp32 per step
    kv_cache_bytes: int = 0  # this rank's KV cache, all its layers
    kv_cache: str = "dims"  # the grid's KV cache layout that ran (dims | positions)
    step_end_s: List[float] = field(default_factory=list)  # end of each step since the start
    # each sequence's tokens before its end-of-document token (new_tokens if none came)
    lengths: List[int] = field(default_factory=list)
    log_probs: Optional[torch.Tensor] = None  # [b, new_tokens] of the chosen tokens (fp32)

    @property
    def ttft_s(self) -> float:
        """Time to first token: the prefill (step 0) of the whole batch."""
        return self.step_end_s[0]

    @property
    def tpot_s(self) -> List[float]:
        """Time per output token of each decode step (after the first token)."""
        ends = self.step_end_s
        return [b - a for a, b in zip(ends, ends[1:])]


def kv_cache_bytes(context: StaticInferenceContext) -> int:
    """Bytes of the K and V buffers this rank allocated in a static inference context."""
    return sum(t.numel() * t.element_size()
               for kv in context.key_value_memory_dict.values() for t in kv)


class Sampler:
    """The next token of each sequence from the last stage's TP-gathered fp32 logits [mb, V]:
    argmax (greedy: no params, top_k 1 or temperature 0, as Megatron's flags mean it), else
    megatron's own TorchSampling.sample_from_logits (temperature, then top-k or top-p). Each
    sequence draws from its own torch.Generator seeded with seed + its row, identically on
    every rank: any TP size, grid or micro-batching draws the same tokens from the same
    logits."""

    def __init__(self, params: Optional[SamplingParams], seed: int, batch: int):
        self.params = params
        self.seed = seed
        self.generators: List[Optional[torch.Generator]] = [None] * batch

    @property
    def greedy(self) -> bool:
        p = self.params
        return p is None or p.top_k == 1 or p.temperature == 0.0

    def __call__(self, logits: torch.Tensor, first_row: int) -> torch.Tensor:
        """Tokens [mb, 1] for the rows first_row.. of the batch."""
        if self.greedy:
            return logits.argmax(-1, keepdim=True)
        p = self.params
        tokens = [TorchSampling.sample_from_logits(
            logits[k:k + 1], float(p.temperature), int(p.top_k), float(p.top_p),
            generator=self._generator(first_row + k, logits.device))
            for k in range(logits.size(0))]
        return torch.cat(tokens)[:, None]

    def _generator(self, row: int, device) -> torch.Generator:
        if self.generators[row] is None:
            self.generators[row] = torch.Generator(device=device).manual_seed(self.seed + row)
        return self.generators[row]


def eod_lengths(tokens: torch.Tensor, eod: Optional[int]) -> List[int]:
    """Each row's tokens before its first `eod` (all of them without one)."""
    if eod is None:
        return [tokens.size(1)] * tokens.size(0)
    hit = tokens == eod
    first = torch.where(hit.any(1), hit.int().argmax(1), tokens.size(1))
    return first.tolist()


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


@torch.no_grad()
def generate(model, prompt: torch.Tensor, new_tokens: int, pgs, micro_batches: int = 1,
             keep_logits: bool = False,
             before_step: Optional[Callable[[int], None]] = None,
             kv_cache: Optional[str] = None, prompt_lengths: Optional[List[int]] = None,
             prefill_chunk: Optional[int] = None, sampling: Optional[SamplingParams] = None,
             seed: int = 1234, eod: Optional[int] = None) -> Generation:
    """Generation of `new_tokens` tokens for each prompt of `prompt` [b, s] (needed on
    the first stage; other stages only use its shape). Step 0 is the prefill, steps 1.. decode
    one token each. `before_step(step)` runs before each step (progress output, communication
    counting).

    sampling: megatron's SamplingParams (temperature, top_k, top_p, return_log_probs); None:
    greedy. seed: the sampling seed (the same on every rank). eod: the end-of-document id: a
    sequence's output ends before it (`lengths`; the batch still runs its steps, as the
    stages do not know which sequences finished).

    kv_cache: the grid's KV cache layout (dims | positions | auto, see attention/schedules.py;
    None: the config's); auto is decided for this workload (schedules.decide_kv_cache: micro-
    batch, longest prompt, new tokens), as the CLI and the cost model decide it.
    prompt_lengths: prompts of different lengths, right-padded in `prompt`; as megatron's
    static engine, the batch prefills the shortest and then moves in lockstep, feeding each
    sequence its own prompt tokens until they run out (its tokens are the `new_tokens` after
    its own prompt). prefill_chunk: prefill in chunks of this many
    tokens (each chunk attends to the cached ones)."""
    b, s = prompt.shape
    if b % micro_batches:
        raise ValueError(f"batch size ({b}) must be divisible by the inference micro-batches "
                         f"({micro_batches})")
    lengths = list(prompt_lengths) if prompt_lengths is not None else [s] * b
    if len(lengths) != b or min(lengths) < 1 or max(lengths) > s:
        raise ValueError(f"prompt_lengths must give 1..{s} tokens for each of the {b} prompts")
    if prefill_chunk is not None and prefill_chunk < 1:
        raise ValueError("prefill_chunk must be >= 1")
    sampler = Sampler(sampling, seed, b)
    return_log_probs = sampling is not None and sampling.return_log_probs
    mb = b // micro_batches
    pp_ranks = dist.get_process_group_ranks(pgs.pp) if pgs.pp is not None else [dist.get_rank()]
    stage, stages = pp_ranks.index(dist.get_rank()), len(pp_ranks)
    first, last = stage == 0, stage == stages - 1
    config = get_attr_wrapped_model(model, "config")
    hidden_dtype = config.pipeline_dtype or config.params_dtype
    shortest, longest = min(lengths), max(lengths)
    steps = longest - shortest + new_tokens  # predictions made
    context = StaticInferenceContext(b, longest + new_tokens)
    request_kv_cache(context, kv_cache, mb, longest, new_tokens)
    out = Generation(tokens=torch.empty(b, new_tokens if last else 0, dtype=torch.long))
    predicted = torch.empty(b, steps if last else 0, dtype=torch.long)
    log_probs = torch.empty(b, steps if last and return_log_probs else 0)
    sends = _Sends(micro_batches)
    device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
    own_prompt = torch.tensor(lengths)[:, None] > torch.arange(longest + new_tokens)[None]
    padded = torch.zeros(b, longest + new_tokens, dtype=prompt.dtype)
    if first:
        padded[:, :s] = prompt.cpu()
    chunk = prefill_chunk or shortest
    passes = [(0, c, min(c + chunk, shortest)) for c in range(0, shortest, chunk)]
    passes += [(step, shortest + step - 1, shortest + step) for step in range(1, steps)]

    _sync()
    dist.barrier()
    begin = time.perf_counter()
    for n_pass, (step, lo, hi) in enumerate(passes):
        if before_step is not None and (n_pass == 0 or passes[n_pass - 1][0] != step):
            before_step(step)
        if step == 1:
            context.enable_decode_mode()
        seq = hi - lo
        emits = n_pass + 1 == len(passes) or passes[n_pass + 1][0] != step
        logits_step = []
        for i in range(micro_batches):
            rows = slice(i * mb, (i + 1) * mb)
            context.batch_size_offset = i * mb
            ids = positions = None
            if first:
                ids = padded[rows, lo:hi]
                if step > 0:
                    if stages > 1:  # the last stage sends this micro-batch's prediction
                        token = torch.empty(mb, 1, dtype=torch.long, device=device)
                        dist.recv(token, pp_ranks[-1], group=pgs.pp)
                        token = token.cpu()
                    else:
                        token = predicted[rows, step - 1:step]
                    ids = torch.where(own_prompt[rows, lo:hi], ids, token)
                ids = ids.to(device)
                positions = torch.arange(lo, hi, device=device).expand(mb, seq)
            else:
                hidden = torch.empty(seq, mb, config.hidden_size, dtype=hidden_dtype,
                                     device=device)
                dist.recv(hidden, pp_ranks[stage - 1], group=pgs.pp)
                model.set_input_tensor(hidden)
            output = model(ids, positions, None, inference_context=context)
            if not last:
                sends.start(i, output.contiguous(), pp_ranks[stage + 1], pgs.pp)
                continue
            if not emits:
                continue
            logits = tensor_parallel.gather_from_tensor_model_parallel_region(
                output[:, -1].contiguous(), group=pgs.tp).float()
            token = sampler(logits, i * mb)
            predicted[rows, step] = token[:, 0].cpu()
            if return_log_probs:
                log_probs[rows, step] = torch.log_softmax(logits, -1).gather(
                    -1, token)[:, 0].cpu()
            if keep_logits:
                logits_step.append(logits.cpu())
            if stages > 1 and step + 1 < steps:
                sends.start(i, token, pp_ranks[0], pgs.pp)
        context.sequence_len_offset += seq
        if not emits:
            continue
        if keep_logits and last:
            out.step_logits.append(torch.cat(logits_step))
        _sync()
        out.step_end_s.append(time.perf_counter() - begin)
    sends.wait_all()
    if last:  # each sequence's tokens after its own prompt
        if return_log_probs:
            out.log_probs = torch.empty(b, new_tokens)
        for r, length in enumerate(lengths):
            own = slice(length - shortest, length - shortest + new_tokens)
            out.tokens[r] = predicted[r, own]
            if return_log_probs:
                out.log_probs[r] = log_probs[r, own]
        out.lengths = eod_lengths(out.tokens, eod)
    out.kv_cache_bytes = kv_cache_bytes(context)
    out.kv_cache = kv_cache_used(context) or DIMS.name  # (no grid layer with m > 1 ran)
    return out


class _Sends:
    """This stage's in-flight isend of each micro-batch (hidden states to the next stage, or
    the last stage's tokens to the first). A micro-batch's send of one step is waited right
    before its send of the next step: its receiver consumed it before this stage could get
    that micro-batch again, so the wait returns at once and the pipeline keeps overlapping,
    while at most one tensor per micro-batch stays referenced (not one per step)."""

    def __init__(self, micro_batches: int):
        self.pending: List[Optional[tuple]] = [None] * micro_batches  # (request, tensor)

    def start(self, i: int, tensor: torch.Tensor, dst: int, group) -> None:
        self.wait(i)
        self.pending[i] = (dist.isend(tensor, dst, group=group), tensor)

    def wait(self, i: int) -> None:
        if self.pending[i] is not None:
            self.pending[i][0].wait()
            self.pending[i] = None

    def wait_all(self) -> None:
        for i in range(len(self.pending)):
            self.wait(i)


def greedy_generate(model, prompt: torch.Tensor, new_tokens: int, tp_group,
                    keep_logits: bool = True,
                    before_step: Optional[Callable[[int], None]] = None,
                    **options) -> Generation:
    """generate() for a single pipeline stage (PP = 1), one micro-batch; `options`: kv_cache,
    prompt_lengths, prefill_chunk, sampling, seed, eod."""

    class _Groups:
        tp, pp = tp_group, None

    return generate(model, prompt, new_tokens, _Groups, 1, keep_logits, before_step, **options)


def peak_memory_bytes() -> int:
    """Peak memory of this rank: CUDA allocator peak on GPUs, peak RSS of the process on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def summarize(durations: List[float]) -> dict:
    """mean, median and p90 of a list of durations (seconds)."""
    ordered = sorted(durations)
    p90 = ordered[min(len(ordered) - 1, int(round(0.9 * (len(ordered) - 1))))] if ordered else 0
    return {"mean": statistics.fmean(ordered) if ordered else 0.0,
            "median": statistics.median(ordered) if ordered else 0.0, "p90": p90}
