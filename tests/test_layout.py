"""GridLayout arithmetic against plain formulas; layout and config errors name their rule."""

import itertools

import pytest

from megatron_mxn.grid.layout import GridLayout, MxnConfigError

LAYOUTS = [
    # n, m, h, g, d, r, interleaved
    (2, 2, 8, 2, 16, 16, False),
    (4, 2, 8, 2, 16, 16, False),  # n > g
    (2, 4, 8, 8, 16, 16, True),
    (1, 4, 4, 1, 32, 16, False),  # rotary_percent 0.5
    (2, 2, 4, 4, 12, 0, False),  # no RoPE
    (8, 2, 8, 1, 32, 32, False),  # MQA, n > g
]


@pytest.mark.parametrize("n,m,h,g,d,r,inter", LAYOUTS)
def test_every_row_and_column_is_owned_once(n, m, h, g, d, r, inter):
    lay = GridLayout(n, m, h, g, d, r, inter)
    rows = [x for i, j in lay.ranks() for x in lay.qkv_rows(i, j)]
    cols = [x for i, j in lay.ranks() for x in lay.proj_columns(i, j)]
    assert sorted(rows) == list(range((h + 2 * g) * d))
    assert sorted(cols) == list(range(h * d))
    for i, j in lay.ranks():
        # local rows: this rank's share of megatron's TP local size
        assert len(lay.qkv_rows(i, j)) == (h + 2 * g) * d // (n * m)


@pytest.mark.parametrize("n,m,h,g,d,r,inter", LAYOUTS)
def test_dim_slices_keep_rope_pairs(n, m, h, g, d, r, inter):
    lay = GridLayout(n, m, h, g, d, r, inter)
    dims = [lay.dims(j) for j in range(m)]
    assert sorted(itertools.chain(*dims)) == list(range(d))
    for j, mine in enumerate(dims):
        rot = lay.rotary_dims(j)
        assert rot == mine[:len(rot)]  # rotary dims lead, as megatron's RoPE expects
        half = len(rot) // 2
        for k in range(half if not inter else 0):
            assert rot[k + half] == rot[k] + r // 2  # rotate-half pairs (k, k + r/2)
        for k in range(0, len(rot) if inter else 0, 2):
            assert rot[k] % 2 == 0 and rot[k + 1] == rot[k] + 1  # interleaved pairs


def test_query_rows_are_the_head_groups_heads():
    lay = GridLayout(2, 2, 8, 2, 16, 16)
    slots, d = 8 // 2 + 2, 16
    # rank (1, 0): KV group 1, all its 4 query heads + k + v, dims of slice 0
    rows = lay.qkv_rows(1, 0)
    heads = sorted({(x // d) for x in rows})
    assert heads == [slots * 1 + s for s in range(slots)]
    assert sorted({x % d for x in rows}) == sorted(lay.dims(0))


def test_kv_shared_rank_holds_its_query_heads_and_a_kv_piece():
    lay = GridLayout(4, 2, 8, 2, 16, 16)
    assert lay.kv_shared and lay.kv_heads_per_rank == 1
    q_rows = lay.heads_per_rank * lay.slice_dim
    rows = lay.qkv_rows(3, 1)  # head group 3: KV head 1, its query heads 2,3 of that group
    d, slots = 16, 8 // 2 + 2
    assert sorted({x // d for x in rows[:q_rows]}) == [slots + 2, slots + 3]
    assert len(rows) - q_rows == 2 * lay.slice_dim // 2
    # Its K/V piece is part of its own KV head only; the 2 head groups sharing KV head 1
    # hold together exactly that head's key and value rows of slice 1.
    kv_rows = [(1 * slots + s) * d + x for s in (slots - 2, slots - 1) for x in lay.dims(1)]
    assert set(rows[q_rows:]) < set(kv_rows)
    assert lay.qkv_rows(2, 1)[q_rows:] + rows[q_rows:] == kv_rows
    assert lay.kv_share == 2


@pytest.mark.parametrize("args,rule", [
    ((3, 2, 8, 2, 16, 0), "num_attention_heads (8) must be divisible by the head groups n (3)"),
    ((4, 1, 12, 6, 16, 0), "num_query_groups (6) and head groups n (4) must divide one another"),
    ((1, 3, 4, 4, 16, 0), "head dim kv_channels (16) must be divisible by the dim slices m (3)"),
    ((1, 4, 4, 4, 12, 12), "rotary dims (12) must be divisible by 2*m (8)"),
    ((1, 2, 4, 4, 16, 20), "rotary dims (20) exceed the head dim (16)"),
    ((8, 2, 8, 1, 4, 4), "must split evenly over the n/g = 8 head groups"),
])
def test_layout_errors_name_the_rule(args, rule):
    with pytest.raises(MxnConfigError) as err:
        GridLayout(*args)
    assert rule in str(err.value)


def test_config_accepts_heads_that_tp_cannot_split():
    from megatron_mxn import MxnTransformerConfig

    cfg = MxnTransformerConfig(num_layers=1, hidden_size=96, num_attention_heads=12,
                               num_query_groups=6, tensor_model_parallel_size=8,
                               mxn_dim_slices=4)
    assert (cfg.num_attention_heads, cfg.num_query_groups, cfg.mxn_head_groups) == (12, 6, 2)
    with pytest.raises(MxnConfigError, match=r"num_attention_heads \(12\) must be divisible "
                                             r"by the head groups n = .* = 8"):
        MxnTransformerConfig(num_layers=1, hidden_size=96, num_attention_heads=12,
                             tensor_model_parallel_size=8, mxn_dim_slices=1)
    with pytest.raises(MxnConfigError, match=r"mxn_dim_slices \(3\) must be a positive divisor"):
        MxnTransformerConfig(num_layers=1, hidden_size=96, num_attention_heads=12,
                             tensor_model_parallel_size=8, mxn_dim_slices=3)
