"""Training through Megatron's own pretrain loop (scripts/pretrain_gpt_mxn.py under torchrun,
gloo on CPU): the grid trains exactly like TP, composes with PP/DP/SP/distributed optimizer/
recomputation/fp16/bf16, resumes across layouts and after a killed rank, reads indexed datasets,
rejects bad flags and damaged checkpoints."""

import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from megatron_mxn.megatron_lm.checkpoint_files import check_checkpoint_files
from megatron_mxn.grid.layout import MxnConfigError
from tests.launch import TINY_GPT, rel_diff, run_ranks_apart, torchrun

pytestmark = pytest.mark.launches  # (conftest: not in `make test-fast`)

SCRIPT = "scripts/pretrain_gpt_mxn.py"
KILLED_SCRIPT = "tests/killed_pretrain.py"  # the same, with one rank SIGKILLing itself
FP32_TOL = 1e-5
BF16_TOL = 1e-2
GRID_2X2 = ["--mxn-head-groups", "2", "--mxn-dim-slices", "2"]


def _train(workdir, nproc, layout, *extra, iters=6, ckpt=None, finetune=True, script=SCRIPT,
           real=False):
    args = [*TINY_GPT, *layout, "--train-iters", str(iters), *extra]
    if "--data-path" not in extra:
        args.append("--mock-data")
    if ckpt:
        args += ["--load", str(ckpt)]
        if finetune:
            args += ["--finetune", "--no-load-optim", "--no-load-rng"]
    run = torchrun(script, nproc, args, workdir, real=real)
    if script == SCRIPT:
        assert run.returncode == 0, (run.output[-3000:] +
                                     "".join(run.rank_logs.values())[-6000:])
    return run


@pytest.fixture(scope="module")
def init_ckpt(tmp_path_factory):
    """One set of initial weights for every layout: a single-rank run with lr 0, saved (so
    every run below also loads a TP=1 checkpoint into its own layout)."""
    root = tmp_path_factory.mktemp("init")
    _train(root, 1, [], "--lr", "0", "--min-lr", "0", "--save", str(root / "ckpt"),
           "--save-interval", "1", iters=1)
    return root / "ckpt"


@pytest.fixture(scope="module")
def tp4_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tp4")


@pytest.fixture(scope="module")
def tp4_run(init_ckpt, tp4_dir):
    """The uninterrupted reference run; it saves its iteration 6 (see tp4_ckpt)."""
    return _train(tp4_dir, 4, ["--tensor-model-parallel-size", "4"], "--save",
                  str(tp4_dir / "ckpt"), "--save-interval", "6", ckpt=init_ckpt)


@pytest.fixture(scope="module")
def tp4_ckpt(tp4_run, tp4_dir):
    """tp4_run's checkpoint: 4 shard files, one per TP rank."""
    return tp4_dir / "ckpt"


def _same(run, ref, tol):
    assert len(run.metrics) == len(ref.metrics) > 0
    for key in ("lm loss", "grad norm"):
        assert rel_diff(run.by_iteration(key), ref.by_iteration(key)) < tol, (
            key, run.by_iteration(key), ref.by_iteration(key))


@pytest.mark.parametrize("name,nproc,layout", [
    ("grid_2x2", 4, ["--mxn-head-groups", "2", "--mxn-dim-slices", "2"]),
    ("grid_4x1", 4, ["--mxn-head-groups", "4", "--mxn-dim-slices", "1"]),  # the m = 1 rule
    ("grid_1x4_alongside_tp", 4, ["--tensor-model-parallel-size", "4", "--mxn-dim-slices", "4"]),
    # n = 4 head groups > g = 2 KV heads with m = 2 (TP 8: the same padded vocabulary)
    ("grid_4x2_n_gt_g", 8, ["--mxn-head-groups", "4", "--mxn-dim-slices", "2"]),
])
def test_grid_trains_like_tp4(init_ckpt, tp4_run, tmp_path, name, nproc, layout):
    run = _train(tmp_path, nproc, layout, "--mxn-log-comm", ckpt=init_ckpt)
    _same(run, tp4_run, FP32_TOL)
    rank0 = run.rank_logs[0]
    comm = [line for line in rank0.splitlines() if "[mxn] collectives per iteration" in line]
    assert len(comm) == 6 and " TP " in comm[-1]  # --log-interval 1
    if "--mxn-dim-slices" in layout and layout[-1] != "1":
        assert "> mxn grid:" in rank0  # the layout line at start-up
        assert "dim-slice" in comm[-1]  # the score all-reduce, forward and backward
    assert "iteration        6/       6" in run.rank_logs[nproc - 1]  # Megatron's log format


def test_grid_with_pipeline_trains_like_tp2_pp2(init_ckpt, tmp_path):
    pp = ["--pipeline-model-parallel-size", "2"]
    ref = _train(tmp_path / "tp2pp2", 4, ["--tensor-model-parallel-size", "2", *pp],
                 ckpt=init_ckpt)
    run = _train(tmp_path / "grid", 4, ["--mxn-head-groups", "1", "--mxn-dim-slices", "2", *pp],
                 ckpt=init_ckpt)
    _same(run, ref, FP32_TOL)


def test_grid_with_dp_distributed_optimizer_sp_and_recompute(init_ckpt, tmp_path):
    """grid 1x2 x DP 2 with the distributed optimizer, sequence parallelism and full
    activation recomputation, against TP=2 x DP 2 with the same optimizer and SP."""
    common = ["--use-distributed-optimizer", "--sequence-parallel"]
    ref = _train(tmp_path / "tp2", 4, ["--tensor-model-parallel-size", "2"], *common,
                 ckpt=init_ckpt)
    run = _train(tmp_path / "grid", 4, ["--mxn-head-groups", "1", "--mxn-dim-slices", "2"],
                 *common, "--recompute-granularity", "full", "--recompute-method", "uniform",
                 "--recompute-num-layers", "1", ckpt=init_ckpt)
    _same(run, ref, FP32_TOL)


def test_bf16_grid_trains_like_bf16_tp4(init_ckpt, tmp_path):
    ref = _train(tmp_path / "tp4", 4, ["--tensor-model-parallel-size", "4"], "--bf16",
                 ckpt=init_ckpt)
    run = _train(tmp_path / "grid", 4, ["--mxn-head-groups", "2", "--mxn-dim-slices", "2"],
                 "--bf16", ckpt=init_ckpt)
    _same(run, ref, BF16_TOL)


@pytest.mark.parametrize("first,second", [
    # (grid 2x2 -> TP=4: the distributed-optimizer chain below, fully_reshardable)
    (["--tensor-model-parallel-size", "4"], ["--mxn-head-groups", "2", "--mxn-dim-slices", "2"]),
])
def test_resume_across_layouts_continues_the_same_run(init_ckpt, tp4_run, tmp_path, first,
                                                      second):
    """3 iterations under one layout with --save, iterations 4-6 under the other with --load
    (model, optimizer and scheduler state): equal to the uninterrupted TP=4 run."""
    ckpt = tmp_path / "ckpt"
    _train(tmp_path / "a", 4, first, "--save", str(ckpt), "--save-interval", "100",
           "--exit-interval", "3", iters=6, ckpt=init_ckpt)
    resumed = _train(tmp_path / "b", 4, second, iters=6, ckpt=ckpt, finetune=False)
    loss, norm = resumed.by_iteration("lm loss"), resumed.by_iteration("grad norm")
    assert sorted(loss) == [4, 5, 6]
    assert rel_diff(loss, tp4_run.by_iteration("lm loss")) < FP32_TOL
    assert rel_diff(norm, tp4_run.by_iteration("grad norm")) < FP32_TOL


def _tracker(ckpt):
    return (ckpt / "latest_checkpointed_iteration.txt").read_text().strip()


def _killed(workdir, rank, at, *extra, ckpt, finetune):
    """A grid 2x2 run in which rank `rank` SIGKILLs itself `at` log:N or save:N (see
    tests/killed_pretrain.py); torchrun itself must tear down the other ranks and fail."""
    run = _train(workdir, 4, GRID_2X2, "--kill-rank", str(rank), "--kill-at", at, *extra,
                 ckpt=ckpt, finetune=finetune, script=KILLED_SCRIPT, real=True)
    assert f"[test] rank {rank}: SIGKILL" in run.rank_logs[rank], run.output[-3000:]
    assert run.returncode != 0 and "exitcode  : -9" in run.output, run.output[-3000:]
    assert _gone(workdir), "processes of the killed run outlived it"
    return run


def _gone(workdir, wait=10.0):
    """Whether, within `wait` s, no process names this run's metrics file in its command line
    (every rank has it, and so do children forked from a rank, such as the checkpoint
    writer's multiprocessing Manager)."""
    mark = str(workdir / "metrics.jsonl").encode()
    deadline = time.time() + wait
    while any(mark in _read(cmdline) for cmdline in Path("/proc").glob("[0-9]*/cmdline")):
        if time.time() > deadline:
            return False
        time.sleep(0.5)
    return True


def _read(path):
    try:
        return path.read_bytes()
    except OSError:  # the process exited meanwhile
        return b""


def test_killed_rank_resumes_from_the_last_complete_checkpoint(init_ckpt, tp4_run, tmp_path):
    """A rank SIGKILLed between two checkpoints, then again during a save, loses only the
    iterations since the last complete checkpoint: each resume (model, optimizer, RNG, data
    position) continues the uninterrupted TP=4 run to 1e-5. A save cut short leaves its
    iteration directory without metadata.json and the tracker file on the previous one, so
    Megatron resumes from that; the next save overwrites the partial directory."""
    ckpt = tmp_path / "ckpt"
    save = ["--save", str(ckpt), "--save-interval", "2"]
    a = _killed(tmp_path / "a", 2, "log:3", *save, ckpt=init_ckpt, finetune=True)
    assert _tracker(ckpt) == "2" and not (ckpt / "iter_0000004").exists()

    b = _killed(tmp_path / "b", 0, "save:4", *save, ckpt=ckpt, finetune=False)
    assert f"loading distributed checkpoint from {ckpt} at iteration 2" in b.rank_logs[0]
    assert _tracker(ckpt) == "2"  # iteration 4's save never completed
    assert sorted(p.name for p in (ckpt / "iter_0000004").iterdir()) == [
        ".metadata", "__0_0.distcp", "__1_0.distcp", "__2_0.distcp", "__3_0.distcp"]
    with pytest.raises(MxnConfigError, match="metadata.json is missing"):
        check_checkpoint_files(str(ckpt / "iter_0000004"))

    c = _train(tmp_path / "c", 4, GRID_2X2, *save, ckpt=ckpt, finetune=False)
    assert f"loading distributed checkpoint from {ckpt} at iteration 2" in c.rank_logs[0]
    assert _tracker(ckpt) == "6"
    check_checkpoint_files(str(ckpt / "iter_0000004"))  # rewritten whole

    for run, iterations in ((a, [1, 2, 3]), (b, [3, 4]), (c, [3, 4, 5, 6])):
        assert sorted(run.by_iteration("lm loss")) == iterations
        for key in ("lm loss", "grad norm"):
            assert rel_diff(run.by_iteration(key), tp4_run.by_iteration(key)) < FP32_TOL, key


def test_damaged_checkpoint_fails_on_every_rank(tp4_ckpt, tmp_path):
    """Shards that only some ranks read (the TP=4 checkpoint's last two, under grid 1x2), one
    missing, one truncated: every rank names both and exits, none waits for the others."""
    ckpt = shutil.copytree(tp4_ckpt, tmp_path / "ckpt")
    (ckpt / "iter_0000006" / "__2_0.distcp").unlink()
    with open(ckpt / "iter_0000006" / "__3_0.distcp", "r+b") as f:
        f.truncate(1000)
    run = run_ranks_apart(SCRIPT, 2, [*TINY_GPT, "--mock-data", "--train-iters", "1",
                                      "--mxn-head-groups", "1", "--mxn-dim-slices", "2",
                                      "--load", str(ckpt)], tmp_path / "run", timeout=180)
    assert run.returncode != 0
    for rank, log in run.rank_logs.items():
        assert (f"MxnConfigError: checkpoint {ckpt / 'iter_0000006'} is incomplete: "
                "__2_0.distcp is missing; __3_0.distcp is truncated: 1000 bytes, the metadata "
                "needs ") in log, (rank, log[-2000:])
# The distributed optimizer: one uninterrupted 12-iteration TP=4 run, and chains of 3-iteration
# segments under other layouts, each resumed (model, optimizer, scheduler) from the previous
# segment's checkpoint, in megatron's default optimizer format (dp_reshardable: each rank's flat
# buffer) or the fully reshardable one (by model tensor).
DIST_OPT = ["--use-distributed-optimizer"]
FULLY = ["--dist-ckpt-optim-fully-reshardable"]
TP4 = ["--tensor-model-parallel-size", "4"]
GRID_2X2 = ["--mxn-head-groups", "2", "--mxn-dim-slices", "2"]
TP2_DP2 = ["--tensor-model-parallel-size", "2"]
GRID_1X2_DP2 = ["--mxn-head-groups", "1", "--mxn-dim-slices", "2"]
DIST_OPT_ITERS = 12


@pytest.fixture(scope="module")
def dist_opt_ref(init_ckpt, tmp_path_factory):
    """The uninterrupted run, saving every 3 iterations (dp_reshardable)."""
    root = tmp_path_factory.mktemp("dist_opt_ref")
    run = _train(root, 4, TP4, *DIST_OPT, "--save", str(root / "ckpt"), "--save-interval", "3",
                 iters=DIST_OPT_ITERS, ckpt=init_ckpt)
    return run, root / "ckpt"


def _segment(tmp_path_factory, layout, load, stop, fmt=(), extra=(), resume=True):
    """The run under `layout` up to iteration `stop`, resumed from checkpoint `load` (or
    started from its weights alone: resume=False), saved at `stop` with optimizer format
    `fmt`: (run, its checkpoint)."""
    root = tmp_path_factory.mktemp("segment")
    run = _train(root, 4, layout, *DIST_OPT, *fmt, *extra, "--save", str(root / "ckpt"),
                 "--save-interval", "100", "--exit-interval", str(stop), iters=DIST_OPT_ITERS,
                 ckpt=load, finetune=not resume)
    return run, root / "ckpt"


@pytest.fixture(scope="module")
def tp4_resumed(dist_opt_ref, tmp_path_factory):
    """TP=4 -> TP=4 (dp_reshardable), iterations 4-6; saved fully reshardable."""
    return _segment(tmp_path_factory, TP4, dist_opt_ref[1], 6, FULLY, ["--ckpt-step", "3"])


@pytest.fixture(scope="module")
def grid_2x2_resumed(tp4_resumed, tmp_path_factory):
    """TP=4 -> grid 2x2 (fully reshardable), iterations 7-9."""
    return _segment(tmp_path_factory, GRID_2X2, tp4_resumed[1], 9, FULLY)


@pytest.fixture(scope="module")
def tp4_from_grid_2x2(grid_2x2_resumed, tmp_path_factory):
    """grid 2x2 -> TP=4 (fully reshardable), iterations 10-12."""
    return _segment(tmp_path_factory, TP4, grid_2x2_resumed[1], 12)


@pytest.fixture(scope="module")
def tp2_dp2_first(init_ckpt, tmp_path_factory):
    """TP=2 x DP 2, iterations 1-3, saved dp_reshardable."""
    return _segment(tmp_path_factory, TP2_DP2, init_ckpt, 3, resume=False)


@pytest.fixture(scope="module")
def tp2_dp2_resumed(tp2_dp2_first, tmp_path_factory):
    """TP=2 x DP 2 -> TP=2 x DP 2 (dp_reshardable), iterations 4-6; saved fully reshardable."""
    return _segment(tmp_path_factory, TP2_DP2, tp2_dp2_first[1], 6, FULLY)


@pytest.fixture(scope="module")
def grid_1x2_dp2_resumed(tp2_dp2_resumed, tmp_path_factory):
    """TP=2 x DP 2 -> grid 1x2 x DP 2 (fully reshardable), iterations 7-9."""
    return _segment(tmp_path_factory, GRID_1X2_DP2, tp2_dp2_resumed[1], 9)


@pytest.fixture(scope="module")
def grid_2x2_first(init_ckpt, tmp_path_factory):
    """grid 2x2, iterations 1-3, saved dp_reshardable."""
    return _segment(tmp_path_factory, GRID_2X2, init_ckpt, 3, resume=False)


@pytest.mark.parametrize("segment,first", [
    ("tp4_resumed", 4), ("grid_2x2_resumed", 7), ("tp4_from_grid_2x2", 10),
    ("tp2_dp2_resumed", 4), ("grid_1x2_dp2_resumed", 7),
])
def test_distributed_optimizer_resume_continues_the_same_run(dist_opt_ref, request, segment,
                                                             first):
    """Each resumed segment (same layout with dp_reshardable state, another layout with
    fully reshardable state) equals the uninterrupted run at its 3 iterations."""
    run, _ = request.getfixturevalue(segment)
    ref = dist_opt_ref[0]
    assert sorted(run.by_iteration("lm loss")) == [first, first + 1, first + 2]
    for key in ("lm loss", "grad norm"):
        assert rel_diff(run.by_iteration(key), ref.by_iteration(key)) < FP32_TOL, key


@pytest.mark.parametrize("saved,step,layout,rule", [
    ("dist_opt_ref", "3", GRID_2X2, "saved under TP=4; under this run's grid 2x2 (TP=4)"),
    ("grid_2x2_first", None, TP4, "saved under grid 2x2 (TP=4); under this run's TP=4"),
    ("tp2_dp2_first", None, GRID_1X2_DP2, "saved under TP=2; under this run's grid 1x2 (TP=2)"),
])
def test_per_rank_optimizer_state_is_refused_under_another_grid(request, tmp_path, saved, step,
                                                                layout, rule):
    """dp_reshardable state under another grid would put the Adam moments on other rows: every
    rank refuses it before any collective and names the flags that work."""
    ckpt = request.getfixturevalue(saved)[1]
    flags = [*TINY_GPT, *layout, *DIST_OPT, "--mock-data", "--train-iters", "12",
             "--load", str(ckpt), *(["--ckpt-step", step] if step else [])]
    run = run_ranks_apart(SCRIPT, 4, flags, tmp_path, timeout=180)
    assert run.returncode != 0
    for rank, log in run.rank_logs.items():
        assert "MxnConfigError" in log and "dp_reshardable" in log and rule in log, (
            rank, log[-2000:])
        assert "--dist-ckpt-optim-fully-reshardable" in log and "--no-load-optim" in log


def test_optimizer_layout_rule():
    """Which loads check_optimizer_layout lets through (no processes: the rule alone)."""
    from argparse import Namespace

    from megatron_mxn.grid.layout import MxnConfigError
    from megatron_mxn.megatron_lm.checkpoint_args import check_optimizer_layout

    def run(n, m, **flags):
        return Namespace(load="ckpt", mxn_head_groups=n, mxn_dim_slices=m,
                         use_distributed_optimizer=True, **flags)

    tp4 = Namespace(tensor_model_parallel_size=4)  # saved without megatron_mxn
    grid = Namespace(tensor_model_parallel_size=4, mxn_head_groups=2, mxn_dim_slices=2)
    per_rank, fully = ({"distrib_optim_sharding_type": f} for f in ("dp_reshardable",
                                                                     "fully_reshardable"))
    no_optim_saved = Namespace(tensor_model_parallel_size=4, no_save_optim=True)
    allowed = [
        (run(4, 1), tp4, per_rank),  # same layout
        (run(2, 2), grid, per_rank),
        (run(2, 2), tp4, fully),  # reshards by model tensor
        (run(4, 1), grid, fully),
        (run(2, 2, no_load_optim=True), tp4, per_rank),  # optimizer state not read
        (run(2, 2, finetune=True), tp4, per_rank),
        (run(2, 2), no_optim_saved, per_rank),
        (run(2, 2), tp4, None),  # no distributed-optimizer state in the checkpoint
    ]
    for args, saved, fmt in allowed:
        check_optimizer_layout(args, saved, fmt)
    with pytest.raises(MxnConfigError, match="saved under TP=4; under this run's grid 2x2"):
        check_optimizer_layout(run(2, 2), tp4, per_rank)
    with pytest.raises(MxnConfigError, match="saved under grid 2x2 .TP=4.; under this run's TP=4"):
        check_optimizer_layout(run(4, 1), grid, per_rank)


@pytest.fixture(scope="module")
def indexed_dataset(tmp_path_factory):
    """A tiny Megatron .bin/.idx dataset built with megatron-core's IndexedDatasetBuilder:
    a few repeated token patterns, so that a model can learn it quickly."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix = tmp_path_factory.mktemp("data") / "tiny_text_document"
    rng = np.random.default_rng(0)
    patterns = [rng.integers(1, 1000, size=40) for _ in range(4)]
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.int32)
    for k in range(64):
        doc = np.concatenate([patterns[k % 4], [1022]])  # 1022: NullTokenizer's EOD
        builder.add_document(doc, [len(doc)])
    builder.finalize(f"{prefix}.idx")
    return prefix


def test_indexed_dataset_trains(indexed_dataset, tmp_path):
    run = _train(tmp_path, 2, ["--mxn-head-groups", "1", "--mxn-dim-slices", "2"],
                 "--data-path", str(indexed_dataset), "--split", "100,0,0", iters=3)
    assert sorted(run.by_iteration("lm loss")) == [1, 2, 3]
    assert "GPTDataset" in run.rank_logs[0]


def test_fp16_with_loss_scaling_learns(indexed_dataset, tmp_path):
    run = _train(tmp_path, 2, ["--mxn-head-groups", "1", "--mxn-dim-slices", "2"],
                 "--fp16", "--initial-loss-scale", "4096", "--loss-scale-window", "5",
                 "--data-path", str(indexed_dataset), "--split", "100,0,0", "--lr", "3e-3",
                 iters=20)
    loss = run.by_iteration("lm loss")
    scales = [row["loss scale"] for row in run.metrics]
    print("fp16 lm loss:", [round(loss[i], 3) for i in sorted(loss)], "scales:", scales)
    assert len(loss) == 20 and all(np.isfinite(v) for v in loss.values())
    assert sum(loss[i] for i in range(16, 21)) < 0.8 * sum(loss[i] for i in range(1, 6))
    assert len(set(scales)) > 1  # the dynamic loss scaler moved


@pytest.mark.parametrize("flags,rule", [
    (["--mxn-dim-slices", "2"], "--mxn-dim-slices needs --mxn-head-groups"),
    (["--tensor-model-parallel-size", "2", "--mxn-head-groups", "2", "--mxn-dim-slices", "2"],
     "--tensor-model-parallel-size (2) contradicts --mxn-head-groups 2 x --mxn-dim-slices 2"),
    (["--mxn-head-groups", "2", "--mxn-dim-slices", "1", "--num-attention-heads", "3",
      "--num-query-groups", "3"], "num_attention_heads (3) must be divisible by the head groups"),
    (["--mxn-head-groups", "1", "--mxn-dim-slices", "2", "--kv-channels", "6"],
     "rotary dims (6) must be divisible by 2*m (4)"),
])
def test_bad_flags_fail_on_every_rank(tmp_path, flags, rule):
    run = run_ranks_apart(SCRIPT, 2, [*TINY_GPT, "--train-iters", "1", *flags], tmp_path,
                          timeout=180)
    assert run.returncode != 0
    assert sorted(run.rank_logs) == [0, 1]
    for rank, log in run.rank_logs.items():
        assert rule in log, (rank, log[-2000:])
