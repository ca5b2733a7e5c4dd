"""megatron-core's HybridModel (layer patterns of attention '*', MLP '-', MoE 'E') with the
grid attention computes megatron-core's TP=1 HybridModel; its checkpoints reshard
bit-identically; Mamba patterns are refused on CPU."""

import json

import pytest

from tests.cases import hybrid, runtime
from tests.launch import TINY_GPT, rel_diff, torchrun
from tests.cases.equivalence import compare_with_tp1
from tests.test_equivalence import FP32_TOL, _check

# (pattern, n, m, extra model settings); 1 layer of each kind per pattern half keeps them small
CASES = {
    "mlp_2x2": ("*-*-", 2, 2, {}),
    "mlp_1x4_qk_rmsnorm": ("*-*-", 1, 4, {"qk_norm": "RMSNorm"}),
    # megatron requires sequence parallelism for MoE under TP when training
    "moe_2x2": ("*E*E", 2, 2, {"experts": 4, "sp": True}),
    "moe_1x4": ("*E*E", 1, 4, {"experts": 4, "sp": True}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_hybrid_fp32_matches_tp1(pool4, tmp_path, name):
    pattern, n, m, extra = CASES[name]
    results = pool4.run(compare_with_tp1, ckpt_dir=str(tmp_path), n=n, m=m, hybrid=pattern,
                        **extra)
    _check(results, FP32_TOL)
    keys = results[0]["grad_keys"]
    assert any("mlp.linear_fc1" in k for k in keys)
    if "E" in pattern:
        assert any("experts" in k for k in keys) and any("router" in k for k in keys)
    worst = max(max(r["grad"].values()) for r in results)
    print(f"hybrid {name}: logits {max(r.get('logits', 0) for r in results):.1e}, "
          f"worst grad {worst:.1e}")


def test_hybrid_checkpoint_round_trip_is_bit_identical(pool4, tmp_path):
    dirs = [tmp_path / name for name in ("tp4", "grid")]
    for d in dirs:
        d.mkdir()
    results = pool4.run(runtime.checkpoint_round_trip, dirs=[str(d) for d in dirs],
                        hybrid="*-*E", experts=4, qk_norm="LayerNorm")
    # grid 2x2 read TP=4's; TP=4 read the grid's; TP=1 read the grid's: all equal TP=4's
    assert results == [[True, True, True]] * 4


def test_mamba_pattern_is_refused_on_cpu(pool4):
    for message in pool4.run(hybrid.mamba_refusal, pattern="M*M-"):
        assert "'M*M-' has Mamba layers ('M'), which cannot run on CPU" in message, message
        assert "CUDA kernels of mamba_ssm and causal_conv1d" in message


# ---- through the entry points (torchrun, gloo on CPU) ----

HYBRID = [*TINY_GPT, "--hybrid-layer-pattern", "*-*E", "--num-experts", "4",
          "--moe-router-topk", "2", "--disable-bias-linear"]
SP = ["--sequence-parallel"]  # megatron's MoE trains under TP only with it; decode cannot use it
TRAIN_SCRIPT = "scripts/pretrain_hybrid_mxn.py"
ITERS = 3


def _train(workdir, nproc, layout, *extra, iters=ITERS):
    run = torchrun(TRAIN_SCRIPT, nproc, [*HYBRID, *SP, *layout, "--train-iters", str(iters),
                                          "--mock-data", *extra], workdir)
    assert run.returncode == 0, run.output[-3000:] + "".join(run.rank_logs.values())[-6000:]
    return run


@pytest.fixture(scope="module")
def hybrid_tp4(tmp_path_factory):
    """From one set of initial weights (a 1-rank run with lr 0, saved), TP=4 trains ITERS
    iterations and saves; returns (its run, the initial checkpoint, its checkpoint)."""
    root = tmp_path_factory.mktemp("hybrid")
    init = root / "init"
    _train(root / "init_run", 1, [], "--lr", "0", "--min-lr", "0", "--save", str(init),
           "--save-interval", "1", iters=1)
    ckpt = root / "tp4_ckpt"
    run = _train(root / "tp4", 4, ["--tensor-model-parallel-size", "4"], "--load", str(init),
                 "--finetune", "--no-load-optim", "--no-load-rng", "--save", str(ckpt),
                 "--save-interval", str(ITERS))
    return run, init, ckpt


@pytest.mark.launches
def test_hybrid_pretraining_grid_2x2_logs_tp4_losses(hybrid_tp4, tmp_path):
    ref, init, _ = hybrid_tp4
    run = _train(tmp_path, 4, ["--mxn-head-groups", "2", "--mxn-dim-slices", "2"], "--load",
                 str(init), "--finetune", "--no-load-optim", "--no-load-rng")
    assert "> mxn grid: 2 head groups x 2 dim slices" in run.rank_logs[0]
    assert len(run.metrics) == len(ref.metrics) == ITERS
    for key in ("lm loss", "grad norm"):
        err = rel_diff(run.by_iteration(key), ref.by_iteration(key))
        print(f"hybrid pretraining grid 2x2 vs TP=4, {key}: {ref.by_iteration(key)} "
              f"{run.by_iteration(key)}, rel diff {err:.1e}")
        assert err < FP32_TOL, (key, run.by_iteration(key), ref.by_iteration(key))


@pytest.mark.launches
def test_hybrid_generation_grid_2x2_gives_tp4_tokens(hybrid_tp4, tmp_path):
    """`python -m megatron_mxn.inference.generate` with --hybrid-layer-pattern: the trained TP=4
    checkpoint generates the same tokens under TP=4 and grid 2x2."""
    _, _, ckpt = hybrid_tp4
    reports = {}
    for name, layout in (("tp4", ["--tensor-model-parallel-size", "4"]),
                         ("grid", ["--mxn-head-groups", "2", "--mxn-dim-slices", "2"])):
        out = tmp_path / f"{name}.json"
        run = torchrun("-m megatron_mxn.inference.generate", 4,
                       [*HYBRID, *layout, "--load", str(ckpt), "--batch-size", "2",
                        "--prompt-length", "8", "--max-new-tokens", "6", "--warmup-steps", "0",
                        "--output-json", str(out)], tmp_path / name, metrics=False)
        assert run.returncode == 0, run.output[-3000:] + "".join(run.rank_logs.values())[-6000:]
        reports[name] = json.loads(out.read_text())
    tp4, grid = reports["tp4"], reports["grid"]
    assert grid["tokens_sha256"] == tp4["tokens_sha256"], (grid["tokens_head"], tp4["tokens_head"])
    assert len(tp4["tokens_head"][0]) == 6
