"""megatron_mxn.attention.kernels against attention written from the formula (fp64 scores, an
explicit mask, softmax), forward and gradients; plus the O(s) memory of the offset causal path."""

import re
import warnings
from unittest import mock

import pytest
import torch

from megatron_mxn.attention import kernels as ak
from megatron_mxn.attention.kernels import attention
from megatron_mxn.attention.mask import MaskSpec

B, D = 2, 16
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


@pytest.fixture(autouse=True)
def one_thread():
    """The CPU is shared: spinning OpenMP threads make these small kernels many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def reference(q, k, v, scale, causal, q_offset, padding_mask=None, window=None, sink=None):
    """Row r of query head t: softmax over keys j of scale * q[t, r] . k[t // (hq/hk), j], key j
    hidden when j > q_offset + r (causal), outside the window (left, right) around q_offset + r
    (-1: unbounded side) or where padding_mask says so; sink: one more logit per head in the
    denominator. An all-hidden row gives 0."""
    hq, sq, hk, sk = q.shape[1], q.shape[2], k.shape[1], k.shape[2]
    kv_head = torch.tensor([t // (hq // hk) for t in range(hq)])
    kh, vh = k.double()[:, kv_head], v.double()[:, kv_head]
    scores = torch.einsum("bhqd,bhkd->bhqk", q.double(), kh) * scale
    hidden = torch.zeros(q.shape[0], hq, sq, sk, dtype=torch.bool)
    if causal:
        hidden |= torch.arange(sk)[None, :] > (q_offset + torch.arange(sq))[:, None]
    if padding_mask is not None:
        hidden |= padding_mask
    if window is not None:
        pos, key = (q_offset + torch.arange(sq))[:, None], torch.arange(sk)[None, :]
        if window[0] >= 0:
            hidden |= key < pos - window[0]
        if window[1] >= 0:
            hidden |= key > pos + window[1]
    scores = scores.masked_fill(hidden, float("-inf"))
    if sink is not None:  # the sink column joins the softmax and leaves before P V
        column = sink.double().view(1, hq, 1, 1).expand(q.shape[0], hq, sq, 1)
        probs = torch.softmax(torch.cat([scores, column], -1), -1)[..., :-1]
        return torch.einsum("bhqk,bhkd->bhqd", probs, vh)
    probs = torch.where(hidden.all(-1, keepdim=True), 0.0, torch.softmax(scores, -1))
    return torch.einsum("bhqk,bhkd->bhqd", probs, vh)


def make(hq, hk, sq, sk, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, h, s, D, generator=g).to(dtype).requires_grad_()
            for h, s in ((hq, sq), (hk, sk), (hk, sk))]


def check(q, k, v, *, causal, q_offset=0, padding_mask=None, backend, window=None, sink=None):
    """Output and dq, dk, dv (and d sink) agree with the reference, relative to the reference's
    largest entry. window: megatron's (left, right), which replaces causal and padding."""
    scale = D ** -0.5
    mask = MaskSpec.of(causal, q_offset, window, padding_mask)
    inputs = (q, k, v) if sink is None else (q, k, v, sink)
    out = attention(q, k, v, scale=scale, mask=mask, sink=sink, backend=backend)
    assert out.dtype == q.dtype and out.shape == q.shape
    leaves = [x.detach().double().requires_grad_() for x in inputs]
    if window is None:
        ref = reference(*leaves[:3], scale, causal, q_offset, padding_mask,
                        sink=None if sink is None else leaves[3])
    else:
        ref = reference(*leaves[:3], scale, False, q_offset, None, window,
                        None if sink is None else leaves[3])
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    got = torch.autograd.grad(out, inputs, grad.to(out.dtype))
    want = torch.autograd.grad(ref, leaves, grad)
    tol = TOL[q.dtype]
    for name, a, b in zip(("out", "dq", "dk", "dv", "dsink"), (out, *got), (ref, *want)):
        err = (a.double() - b).abs().max().item()
        assert err <= tol * max(b.abs().max().item(), 1e-6), f"{name}: max error {err:.3g}"


# (causal, sq, sk, q_offset): no mask; causal square; chunks in the middle (24, 40, a 1-key past);
# lower-right (sk - sq); offset 0 with keys beyond the chunk; decode at the end and mid-cache.
CASES = {
    "nomask": (False, 16, 64, 0),
    "causal_square": (True, 32, 32, 0),
    "causal_offset0": (True, 16, 64, 0),
    "causal_mid1": (True, 16, 64, 1),
    "causal_mid24": (True, 16, 64, 24),
    "causal_mid40": (True, 16, 64, 40),
    "causal_lower_right": (True, 16, 64, 48),
    "decode_last": (True, 1, 64, 63),
    "decode_mid": (True, 1, 64, 30),
}
HEADS = {"mha": (4, 4), "gqa": (4, 2), "mqa": (4, 1)}


@pytest.mark.parametrize("backend", ["torch", "unfused"])
@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("case", CASES)
def test_matches_reference_fp32(case, heads, backend):
    causal, sq, sk, q_offset = CASES[case]
    check(*make(*HEADS[heads], sq, sk), causal=causal, q_offset=q_offset, backend=backend)


@pytest.mark.parametrize("backend", ["torch", "unfused"])
@pytest.mark.parametrize("case", ["nomask", "causal_square", "causal_mid24", "causal_lower_right",
                                  "decode_last"])
def test_matches_reference_bf16(case, backend):
    causal, sq, sk, q_offset = CASES[case]
    check(*make(4, 2, sq, sk, torch.bfloat16), causal=causal, q_offset=q_offset, backend=backend)


@pytest.mark.parametrize("backend", ["torch", "unfused"])
@pytest.mark.parametrize("mask_heads", [1, 4])
@pytest.mark.parametrize("case", ["nomask", "causal_mid24", "decode_mid"])
def test_padding_mask(case, mask_heads, backend):
    causal, sq, sk, q_offset = CASES[case]
    mask = torch.rand(B, mask_heads, sq, sk, generator=torch.Generator().manual_seed(2)) < 0.3
    mask[..., 0] = False  # every row keeps key 0 (fully hidden rows: test_fully_masked_row)
    check(*make(4, 2, sq, sk), causal=causal, q_offset=q_offset, padding_mask=mask, backend=backend)


@pytest.mark.parametrize("backend", ["torch", "unfused"])
def test_fully_masked_row_gives_zero(backend):
    q, k, v = make(4, 2, 8, 32)
    mask = torch.zeros(B, 1, 8, 32, dtype=torch.bool)
    mask[:, :, 3] = True
    check(q, k, v, causal=True, q_offset=20, padding_mask=mask, backend=backend)
    out = attention(q, k, v, scale=0.25, mask=MaskSpec(True, 20, padding=mask), backend=backend)
    assert torch.all(out[:, :, 3] == 0)


def test_offset_chunk_uses_split_flash_and_non_contiguous_inputs():
    """The CPU offset path is the two-block flash op (not a mask), also on [b, s, h, d] views, and
    with two threads."""
    torch.set_num_threads(2)
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(B, s, h, D, generator=g).transpose(1, 2).requires_grad_()
               for s, h in ((16, 4), (64, 2), (64, 2)))
    split = ak._OffsetCausalFlash
    with mock.patch.object(split, "apply", wraps=split.apply) as spy:
        check(q, k, v, causal=True, q_offset=24, backend="auto")
    assert spy.call_count == 1


def test_fallback_without_private_ops_matches_and_warns_once(monkeypatch):
    monkeypatch.setattr(ak, "_HAS_CPU_FLASH", False)
    monkeypatch.setattr(ak, "_warned_materialise", False)
    with pytest.warns(UserWarning, match="materialise"):
        check(*make(4, 2, 16, 64), causal=True, q_offset=24, backend="torch")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check(*make(4, 1, 16, 64), causal=True, q_offset=40, backend="torch")


@pytest.mark.parametrize("backend", ["torch", "unfused"])
def test_dropout_keeps_causality(backend):
    """Dropout changes the output but never lets a row see keys past its position."""
    q, k, v = make(4, 2, 16, 64)
    torch.manual_seed(0)
    out = attention(q, k, v, scale=0.25, mask=MaskSpec(True, 24), dropout_p=0.5, backend=backend)
    clean = attention(q, k, v, scale=0.25, mask=MaskSpec(True, 24), backend=backend)
    assert out.shape == q.shape and torch.isfinite(out).all() and not torch.allclose(out, clean)
    dq, dk, dv = torch.autograd.grad(out[:, :, :5].sum(), (q, k, v))  # rows 0..4: keys 0..28
    assert torch.all(dk[:, :, 29:] == 0) and torch.all(dv[:, :, 29:] == 0)
    assert dv[:, :, :29].abs().sum() > 0 and torch.all(dq[:, :, 5:] == 0)


@pytest.mark.parametrize("bad, match", [
    (dict(k=(3, 64)), "multiple of hk"),
    (dict(q_offset=49), "q_offset"),
    (dict(q_offset=-1), "q_offset"),
    (dict(backend="flash3"), "backend"),
    (dict(mask=torch.zeros(B, 1, 16, 64)), "padding_mask"),
    (dict(mask=torch.zeros(B, 1, 16, 63, dtype=torch.bool)), "padding_mask"),
    (dict(dropout_p=1.0), "dropout_p"),
    (dict(dtype=torch.bfloat16), "dtypes"),
])
def test_impossible_requests_raise(bad, match):
    q = torch.randn(B, 4, 16, D)
    k = torch.randn(B, *bad.get("k", (2, 64)), D)
    v = k.to(bad.get("dtype", torch.float32))
    with pytest.raises(ValueError, match=match):
        attention(q, k, v, scale=0.25,
                  mask=MaskSpec(True, bad.get("q_offset", 0), padding=bad.get("mask")),
                  dropout_p=bad.get("dropout_p", 0.0), backend=bad.get("backend", "auto"))


def _peak_rss_mib(reset: bool = False) -> float:
    """This process's peak RSS (VmHWM); `reset` restarts it from the current RSS (Linux)."""
    if reset:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    with open("/proc/self/status") as f:
        return int(re.search(r"VmHWM:\s+(\d+)", f.read()).group(1)) / 1024


def _peak_growth_mib(fn) -> float:
    before = _peak_rss_mib(reset=True)
    fn()
    return _peak_rss_mib() - before


def test_offset_causal_chunk_memory_is_linear(monkeypatch):
    """fwd+bwd of a 4096-row chunk at offset 12288 (its fp32 sq x visible-keys matrix: 256 MiB)
    grows peak RSS by far less than that matrix; the same meter sees the materialised-mask path."""
    try:
        _peak_rss_mib(reset=True)
    except OSError as e:
        pytest.skip(f"cannot reset the peak RSS here: {e}")
    sq, q_offset, d = 4096, 12288, 16
    sk = q_offset + sq + 1024  # keys past the chunk: sliced off, never attended
    matrix_mib = sq * (q_offset + sq) * 4 / 2 ** 20
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 1, s, d, generator=g).requires_grad_() for s in (sq, sk, sk))
    chunk = lambda: attention(q, k, v, scale=d ** -0.5, mask=MaskSpec(True, q_offset))
    attention(q[:, :, :16], k[:, :, :64], v[:, :, :64], scale=0.25, mask=MaskSpec(True, 32))
    grown = _peak_growth_mib(lambda: chunk().sum().backward())
    monkeypatch.setattr(ak, "_HAS_CPU_FLASH", False)
    monkeypatch.setattr(ak, "_warned_materialise", True)
    with torch.no_grad():
        grown_materialised = _peak_growth_mib(chunk)
    print(f"peak RSS growth: split flash fwd+bwd {grown:.1f} MiB, materialised-mask fwd "
          f"{grown_materialised:.1f} MiB, sq x visible-keys fp32 matrix {matrix_mib:.0f} MiB")
    assert matrix_mib >= 256
    assert grown < matrix_mib / 4
    assert grown_materialised > matrix_mib / 4  # the meter does see an s_q x s_k tensor


@pytest.mark.parametrize("backend", ["auto", "unfused"])
@pytest.mark.parametrize("hq,hk,sq,sk,masked,dtype", [
    (4, 2, 1, 37, False, torch.float32),  # a decode step (CPU: the flash op)
    (4, 1, 1, 37, False, torch.bfloat16),
    (4, 2, 5, 12, True, torch.float32),  # a prefill chunk: strided causal mask
    (4, 2, 1, 0, False, torch.float32),  # a rank that owns no position yet
])
def test_attention_with_lse_is_a_mergeable_share(backend, hq, hk, sq, sk, masked, dtype):
    """Two key shares, each through attention_with_lse, merged by their log-sum-exps, give the
    attention over all keys (the position-sharded KV cache's combination)."""
    q, k, v = (x.detach() for x in make(hq, hk, sq, 2 * sk, dtype))
    scale = D ** -0.5
    hidden = torch.zeros(B, 1, sq, 2 * sk, dtype=torch.bool)
    if masked:
        hidden[..., 1::3] = True
    outs, lses = [], []
    for share in (slice(0, 2 * sk, 2), slice(1, 2 * sk, 2)):  # even and odd positions
        out, lse = ak.attention_with_lse(q, k[:, :, share], v[:, :, share], scale=scale,
                                         mask=hidden[..., share] if masked else None,
                                         backend=backend)
        assert out.dtype == lse.dtype == torch.float32 and lse.shape == (B, hq, sq)
        outs.append(out)
        lses.append(lse)
    total = torch.logsumexp(torch.stack(lses), 0)
    merged = sum(torch.exp(l - total).nan_to_num(0.0).unsqueeze(-1) * o
                 for o, l in zip(outs, lses))
    want = reference(q, k, v, scale, False, 0, hidden if masked else None)
    if sk == 0:
        assert torch.equal(merged, torch.zeros_like(merged))
        assert torch.isinf(lses[0]).all() and (lses[0] < 0).all()
        return
    err = ((merged.double() - want).abs().max() / want.abs().max()).item()
    assert err < TOL[dtype], err


# Sliding windows, megatron's (left, right): (sq, sk, q_offset, window). Shorter than, equal to
# and longer than the sequence; a decode row; a chunk at an offset whose band starts inside it;
# right > 0 (not causal); -1 (unbounded left: plain causal); many rows (query tiles of 128).
WINDOWS = {
    "short": (16, 16, 0, (3, 0)),
    "equal": (16, 16, 0, (16, 0)),
    "longer": (16, 16, 0, (40, 0)),
    "chunk_at_offset": (12, 64, 24, (5, 0)),
    "decode": (1, 37, 36, (8, 0)),
    "two_sided": (16, 16, 0, (4, 2)),
    "unbounded_left": (16, 64, 48, (-1, 0)),
    "tiled": (300, 300, 0, (7, 0)),
}


@pytest.mark.parametrize("backend", ["auto", "unfused"])
@pytest.mark.parametrize("case", list(WINDOWS))
def test_sliding_window(case, backend):
    sq, sk, q_offset, window = WINDOWS[case]
    check(*make(4, 2, sq, sk), causal=True, q_offset=q_offset, window=window, backend=backend)


def test_window_cuts_keys_and_tiles_rows():
    """A binding window never hands the kernel a key outside the rows' band: gradients of keys
    no row sees are exactly zero, and 300 rows run in tiles (one SDPA call each)."""
    q, k, v = make(4, 2, 300, 300)
    with mock.patch.object(ak, "_sdpa", wraps=ak._sdpa) as spy:
        out = attention(q, k, v, scale=0.25, mask=MaskSpec.of(True, 0, (7, 0)))
    assert spy.call_count == 3  # rows 0-127, 128-255, 256-299
    assert all(call.args[1].shape[2] <= 128 + 7 for call in spy.call_args_list)
    dk = torch.autograd.grad(out[:, :, 200:210].sum(), k)[0]
    assert torch.all(dk[:, :, :193] == 0) and torch.all(dk[:, :, 210:] == 0)
    assert dk[:, :, 193:210].abs().sum() > 0


# Attention sinks on every kernel path: no mask, causal square, causal chunk at an offset (the
# split flash op on CPU), padding, window, decode row; learnable values and off-by-one zeros.
SINKS = {
    "nomask": (False, 16, 64, 0, None, False),
    "causal": (True, 16, 16, 0, None, False),
    "offset": (True, 12, 64, 24, None, False),
    "padding": (True, 12, 64, 24, None, True),
    "window": (True, 12, 64, 24, (5, 0), False),
    "decode": (True, 1, 37, 36, None, False),
}


@pytest.mark.parametrize("backend", ["auto", "unfused"])
@pytest.mark.parametrize("case", list(SINKS))
@pytest.mark.parametrize("kind", ["learnable", "off-by-one"])
def test_attention_sink(case, backend, kind):
    causal, sq, sk, q_offset, window, padded = SINKS[case]
    sink = (torch.randn(4, generator=torch.Generator().manual_seed(5)) if kind == "learnable"
            else torch.zeros(4)).requires_grad_()
    mask = None
    if padded:
        mask = torch.rand(B, 1, sq, sk, generator=torch.Generator().manual_seed(2)) < 0.3
    check(*make(4, 2, sq, sk), causal=causal, q_offset=q_offset, padding_mask=mask,
          window=window, sink=sink, backend=backend)


def test_mask_description_rules():
    """MaskSpec.of follows megatron: a window replaces causal and padding, right = 0 is causal;
    key_range is the rows' band; simplified drops what hides nothing."""
    pad = torch.zeros(1, 1, 4, 8, dtype=torch.bool)
    assert MaskSpec.of(True, 4, None, pad).padding is pad
    windowed = MaskSpec.of(True, 4, (2, 0), pad)
    assert (windowed.causal, windowed.left, windowed.right, windowed.padding) == (True, 2, None,
                                                                                  None)
    assert MaskSpec.of(False, 0, (2, 3)).causal is False
    assert MaskSpec.of(True, 0, (-1, 0)) == MaskSpec(True, 0)
    assert windowed.key_range(4, 8) == (2, 8)  # rows at 4..7 see keys 2..7
    assert MaskSpec(True, 0, 1).key_range(4, 8) == (0, 4)
    assert MaskSpec(False, 0, None, 1).key_range(4, 8) == (0, 5)
    assert MaskSpec(True, 7).hides_nothing(1, 8)  # a decode row sees all keys
    assert MaskSpec(True, 0, 16).simplified(16, 16) == MaskSpec(True, 0)
    assert MaskSpec(True, 4, 2).tensor(2, 8).view(2, 8).tolist() == [
        [k < 2 or k > 4 for k in range(8)], [k < 3 or k > 5 for k in range(8)]]
    strided = MaskSpec(True, 6, 3).tensor(1, 3, key_positions=torch.tensor([1, 4, 7]))
    assert strided.view(-1).tolist() == [True, False, True]
