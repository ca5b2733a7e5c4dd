"""The generation loop's sampler (in process, no ranks): Megatron's greedy, temperature,
top-k and top-p semantics through megatron-core's own sampling function; seeds reproduce and
do not depend on how the batch is split into micro-batches; end-of-document lengths."""

import pytest
import torch
from megatron.core.inference.sampling_params import SamplingParams

from megatron_mxn.grid.layout import MxnConfigError
from megatron_mxn.inference.generate_flags import GENERATE, check_sampling
from megatron_mxn.inference.generation import Sampler, eod_lengths

ROWS = 400
PROBS = torch.tensor([0.5, 0.3, 0.15, 0.05])  # the distribution every row samples from


def _draw(seed=7, rows=ROWS, split=None, **params):
    sampler = Sampler(SamplingParams(**params), seed, rows)
    logits = PROBS.log().expand(rows, -1).clone()
    split = split or rows
    return torch.cat([sampler(logits[r:r + split], r) for r in range(0, rows, split)])[:, 0]


def _frequencies(tokens):
    return torch.bincount(tokens, minlength=len(PROBS)).float() / len(tokens)


def test_greedy_is_argmax():
    logits = torch.randn(5, 11, generator=torch.Generator().manual_seed(0))
    want = logits.argmax(-1, keepdim=True)
    for params in (None, SamplingParams(top_k=1, temperature=0.7),
                   SamplingParams(temperature=0.0, top_k=0, top_p=0.9)):
        assert torch.equal(Sampler(params, 1, 5)(logits, 0), want)


def test_temperature_top_k_and_top_p_follow_megatrons_semantics():
    plain = _frequencies(_draw(top_k=0))
    assert (plain - PROBS).abs().max() < 0.06  # temperature 1: the model's distribution
    hot = _frequencies(_draw(top_k=0, temperature=100.0))
    assert (hot - 0.25).abs().max() < 0.07  # a high temperature flattens it
    cold = _frequencies(_draw(top_k=0, temperature=0.05))
    assert cold[0] > 0.99  # a low one sharpens it to the most likely token
    top2 = _frequencies(_draw(top_k=2))
    assert top2[2:].sum() == 0 and (top2[:2] - torch.tensor([0.625, 0.375])).abs().max() < 0.07
    # top-p 0.7: the smallest set of most likely tokens whose probability reaches 0.7
    nucleus = _frequencies(_draw(top_k=0, top_p=0.7))
    assert nucleus[2:].sum() == 0 and nucleus[1] > 0.2


def test_seeds_reproduce_and_ignore_micro_batching():
    a = _draw(seed=3, top_k=0)
    assert torch.equal(a, _draw(seed=3, top_k=0))
    assert torch.equal(a, _draw(seed=3, top_k=0, split=100))  # 4 micro-batches
    assert not torch.equal(a, _draw(seed=4, top_k=0))


def test_end_of_document_lengths():
    tokens = torch.tensor([[5, 9, 2, 9], [1, 2, 3, 4], [9, 9, 9, 9]])
    assert eod_lengths(tokens, 9) == [1, 4, 0]
    assert eod_lengths(tokens, None) == [4, 4, 4]


@pytest.mark.parametrize("flags,rule", [
    (["--top_p", "0.9"], "--top_k (1) and --top_p (0.9) cannot both be set (Megatron's rule)"),
    (["--temperature", "-1"], "sampling needs --temperature >= 0"),
    (["--top_k", "0", "--top_p", "1.5"], "--top_p in [0, 1]"),
])
def test_entry_point_refuses_bad_sampling_flags(flags, rule):
    """(check_request runs it on every rank before any collective)"""
    with pytest.raises(MxnConfigError) as err:
        check_sampling(GENERATE.parse_args(flags))
    assert rule in str(err.value)
    check_sampling(GENERATE.parse_args(["--top_k", "0", "--top_p", "0.9"]))  # fine
