"""Multi-latent attention (MLA) through the Megatron-LM entry points, on CPU (gloo): Megatron's
MLA flags (`--multi-latent-attention --q-lora-rank --kv-lora-rank --qk-head-dim
--qk-pos-emb-head-dim --v-head-dim`, YaRN RoPE) pretrain on grid 2x2 exactly like megatron-core's
MLA at TP=1 (scripts/pretrain_gpt_mxn.py, from one TP=1 checkpoint), and megatron-core's MLA
generates at TP=4 (its static KV cache of the up-projected K and V, the reference MLA core)
the same greedy tokens as at TP=1, with the KV cache the cost model predicts; generation refuses
what the grid's MLA does not compute on every rank before any collective."""

import json

import pytest

from megatron_mxn.analysis.cost_model import Layout, ModelShape, kv_cache_bytes
from tests.launch import TINY_GPT, rel_diff, run_ranks_apart, torchrun

pytestmark = pytest.mark.launches  # (conftest: not in `make test-fast`)

FP32_TOL = 1e-5
# the tiny GPT of the other entry-point tests without its query groups (Megatron refuses MLA
# with GQA), with MLA: q and kv latents with their norms, YaRN with an mscale != 1 on the RoPE
# dims and the softmax scale, changing the frequencies within the 32 positions
MLA_GPT = [f for k, f in enumerate(TINY_GPT) if f != "--group-query-attention"
           and "--num-query-groups" not in TINY_GPT[max(k - 1, 0):k + 1]] + [
    "--multi-latent-attention", "--q-lora-rank", "48", "--kv-lora-rank", "32",
    "--qk-head-dim", "16", "--qk-pos-emb-head-dim", "8", "--v-head-dim", "12",
    "--qk-layernorm", "--normalization", "RMSNorm", "--rope-type", "yarn",
    "--rotary-scaling-factor", "4", "--yarn-original-max-position-embeddings", "4",
    "--mscale", "1.0", "--mscale-all-dim", "0.707"]
GRID_2X2 = ["--mxn-head-groups", "2", "--mxn-dim-slices", "2"]


def _train(workdir, nproc, layout, *extra, iters=4, ckpt=None):
    args = [*MLA_GPT, *layout, "--mock-data", "--train-iters", str(iters), *extra]
    if ckpt:
        args += ["--load", str(ckpt), "--finetune", "--no-load-optim", "--no-load-rng"]
    run = torchrun("scripts/pretrain_gpt_mxn.py", nproc, args, workdir)
    assert run.returncode == 0, run.output[-3000:] + "".join(run.rank_logs.values())[-6000:]
    return run


@pytest.fixture(scope="module")
def mla_ckpt(tmp_path_factory):
    """The initial weights of every run: one TP=1 iteration with lr 0, saved."""
    root = tmp_path_factory.mktemp("mla_init")
    _train(root, 1, [], "--lr", "0", "--min-lr", "0", "--save", str(root / "ckpt"),
           "--save-interval", "1", iters=1)
    return root / "ckpt"


def test_mla_flags_train_on_grid_2x2_like_tp1(mla_ckpt, tmp_path):
    """4 iterations from the same TP=1 checkpoint: lm loss and grad norm of grid 2x2 within
    1e-5 of megatron-core's MLA at TP=1 (megatron's own MLA at TP > 1 gets two gradients wrong:
    docs/design.md, section 7)."""
    ref = _train(tmp_path / "tp1", 1, [], ckpt=mla_ckpt)
    run = _train(tmp_path / "grid", 4, GRID_2X2, ckpt=mla_ckpt)
    assert len(run.metrics) == len(ref.metrics) == 4
    errors = {key: rel_diff(run.by_iteration(key), ref.by_iteration(key))
              for key in ("lm loss", "grad norm")}
    print(f"grid 2x2 vs TP=1: lm loss {ref.by_iteration('lm loss')} vs "
          f"{run.by_iteration('lm loss')}; relative differences {errors}")
    assert max(errors.values()) < FP32_TOL, errors
    assert "> mxn grid: 2 head groups x 2 dim slices" in run.rank_logs[0]


def _generate(workdir, nproc, layout, ckpt):
    out = workdir / "report.json"
    run = torchrun("scripts/generate_mxn.py", nproc, [
        *MLA_GPT, *layout, "--load", str(ckpt), "--batch-size", "2", "--prompt-length", "12",
        "--max-new-tokens", "6", "--warmup-steps", "0", "--output-json", str(out)],
        workdir, metrics=False)
    assert run.returncode == 0, run.output[-3000:] + "".join(run.rank_logs.values())[-6000:]
    return json.loads(out.read_text())


def test_megatrons_mla_generates_at_tp4_like_tp1(mla_ckpt, tmp_path):
    """The generation entry point with Megatron's MLA flags at TP=4 (no grid): megatron-core's
    MLA on its static KV cache gives TP=1's greedy tokens; its cache per rank is the cost
    model's (the up-projected K and V of h/TP heads, all positions)."""
    tp1 = _generate(tmp_path / "tp1", 1, [], mla_ckpt)
    tp4 = _generate(tmp_path / "tp4", 4, ["--tensor-model-parallel-size", "4"], mla_ckpt)
    ids = tp4["generated_token_ids"]
    assert len(ids) == 2 and all(len(seq) == 6 for seq in ids), ids
    assert tp4["tokens_sha256"] == tp1["tokens_sha256"]
    flags = {"num-layers": 2, "hidden-size": 64, "num-attention-heads": 8, "vocab-size": 1023,
             "multi-latent-attention": True, "kv-lora-rank": 32, "qk-head-dim": 16,
             "qk-pos-emb-head-dim": 8, "v-head-dim": 12}
    model = ModelShape.from_flags(flags)
    for report, tp in ((tp1, 1), (tp4, 4)):
        # batch 2 x (12 + 6) positions x 8/TP heads x (16 + 8 + 12) x 4 B x 2 layers
        want = 2 * 18 * (8 // tp) * 36 * 4 * 2
        assert kv_cache_bytes(model, Layout(tp=tp), 2, 18) == want
        assert report["kv_cache_bytes_per_rank"] == want, (tp, report["kv_cache_bytes_per_rank"])


def test_generation_refuses_what_the_grids_mla_does_not_compute_before_any_collective(
        mla_ckpt, tmp_path):
    """--mla-down-proj-fusion (FusedMLASelfAttention) on the grid: every rank, on its own
    (ranks that live apart), exits with the option named before Megatron's initialization."""
    run = run_ranks_apart("scripts/generate_mxn.py", 4, [
        *MLA_GPT, *GRID_2X2, "--mla-down-proj-fusion", "--load", str(mla_ckpt),
        "--batch-size", "2", "--prompt-length", "8"], tmp_path)
    assert run.returncode != 0
    assert sorted(run.rank_logs) == [0, 1, 2, 3]
    for rank, log in run.rank_logs.items():
        assert "MxnConfigError: mla_down_proj_fusion=True is not supported by the grid " \
               "attention: FusedMLASelfAttention" in log, (rank, log[-2000:])
        assert "> initializing torch distributed" not in log, rank
