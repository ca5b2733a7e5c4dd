"""The generation entry point and the A/B driver, run for real (torchrun, gloo, CPU)."""

import csv
import dataclasses
import json
from collections import Counter

import pytest

from megatron_mxn.accounting import calls_by_group, count_rows
from megatron_mxn.megatron_lm.run_configs import load_config
from megatron_mxn.analysis.cost_model import ModelShape, kv_cache_bytes, step_collectives, weight_bytes
from megatron_mxn.analysis.planner import config_layouts
from megatron_mxn.tools.ab_compare import PRICED
from megatron_mxn.tools.collective_latency import decode_step_seconds, fit
from tests.launch import REPO, run_ranks_apart, torchrun

pytestmark = pytest.mark.launches  # (conftest: not in `make test-fast`)

CPU_DENSE = str(REPO / "configs" / "cpu_dense.yaml")
GRID = "grid 2x2 KV-by-position"  # (--mxn-kv-cache auto picks the positions cache here)
LAYOUT_NAMES = ["TP=2 PP=2", GRID, "TP=4", "TP=4 fused"]  # (fused: --mxn-tp-core fused)
METRICS = ["output_tokens_per_s", "total_tokens_per_s", "tpot_median_s", "tpot_p90_s", "ttft_s",
           "kv_cache_bytes_per_rank", "peak_memory_bytes_per_rank"]


def test_ab_driver_writes_md_csv_png_with_identical_tokens(cpu_dense_ab):
    results, proc = cpu_dense_ab
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    md = (results / "ab.md").read_text()
    assert "All layouts generated identical tokens: yes." in md
    assert "FAILED" not in md and "grid / baseline:" in md and "grid / tp:" in md and \
        "grid / tp_fused:" in md
    for name in LAYOUT_NAMES:
        assert f"| {name} |" in md
    rows = list(csv.DictReader(open(results / "ab.csv")))
    for name in LAYOUT_NAMES:
        got = {r["metric"]: r for r in rows if r["layout"] == name}
        for metric in METRICS:
            assert float(got[metric]["median"]) > 0, (name, metric)
        assert float(got["sent_bytes_per_layer_step_TP"]["median"]) > 0
        assert float(got["collectives_per_layer_step_TP"]["median"]) > 0
        assert int(got["tpot_median_s"]["n"]) == 2  # the repeats
    hashes = {r["median"] for r in rows if r["metric"] == "tokens_sha256"}
    assert len(hashes) == 1
    dim_slice = [r for r in rows if r["metric"] == "sent_bytes_per_layer_step_dim-slice"]
    assert [r["layout"] for r in dim_slice] == [GRID]  # only the grid has dim slices
    # the positions cache's decode step: the new q/k/v all-gather and the combine's all-to-all
    calls = [(r["layout"], float(r["median"])) for r in rows
             if r["metric"] == "collectives_per_layer_step_dim-slice"]
    assert calls == [(GRID, 2.0)], calls
    assert "| collectives / layer / decode step |" in md
    kv = {r["layout"]: float(r["median"]) for r in rows if r["metric"] == "kv_cache_bytes_per_rank"}
    # TP=4 > 2 KV heads replicates; the positions cache holds the dims cache's bytes when m
    # divides the sequence length (prompt 24 + 16 new tokens)
    assert kv[GRID] == kv["TP=2 PP=2"] == kv["TP=4"] / 2
    assert kv["TP=4 fused"] == kv["TP=4"]  # (the same layout: only the kernel differs)
    png = (results / "ab.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_ab_prices_each_layouts_decode_collectives_at_the_measured_latency(cpu_dense_ab):
    """The A/B's collective-latency job ran on the same ranks; each layout's column is its
    decode steps' collectives (its report's comm_steps) priced with that table."""
    results, proc = cpu_dense_ab
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    table = json.loads((results / "ab" / "cpu_dense" / "collective_latency.json").read_text())
    assert table["world"] == 4 and table["backend"] == "gloo"
    md = (results / "ab.md").read_text()
    assert "### Collective latency (cpu_dense's ranks)" in md and "| all_reduce | 4 |" in md
    assert "collectives at measured latency x" in md  # in the grid / other lines
    rows = list(csv.DictReader(open(results / "ab.csv")))
    priced = {r["layout"]: float(r["median"]) for r in rows if r["metric"] == PRICED}
    assert sorted(priced) == sorted(LAYOUT_NAMES)
    fitted = fit(table)
    for name, report_name in [("TP=2 PP=2", "baseline"), (GRID, "grid"), ("TP=4", "tp"),
                              ("TP=4 fused", "tp_fused")]:
        report = json.loads((results / "ab" / "cpu_dense" / f"{report_name}.json").read_text())
        assert priced[name] == pytest.approx(decode_step_seconds(report, fitted)), name
        assert priced[name] > 0
        assert f"| {1e3 * priced[name]:.1f} ms |" in md


def test_generation_reports_the_collectives_the_cost_model_predicts(cpu_dense_ab):
    """Through the entry point, with Megatron's flags: every step's collectives on every
    pipeline stage, the parameter and KV-cache bytes equal megatron_mxn.analysis.cost_model's."""
    results, _ = cpu_dense_ab
    cfg = load_config(CPU_DENSE)
    model = ModelShape.from_flags(cfg["model"])
    for name, layouts in config_layouts(cfg, 4).items():
        report = json.loads((results / "ab" / "cpu_dense" / f"{name}.json").read_text())
        w = report["workload"]
        # the schedule and the (resolved) KV cache the run used
        layout = dataclasses.replace(layouts[0], schedule=report["schedule"],
                                     kv_cache=report["kv_cache"],
                                     micro_batches=w["micro_batches"])
        assert sorted(report["per_stage"]) == [str(s) for s in range(layout.pp)]
        for stage, got in report["per_stage"].items():
            want = [count_rows(step_collectives(model, layout, w["batch"], w["prompt_length"],
                                                k, w["new_tokens"], int(stage)))
                    for k in range(w["new_tokens"])]
            assert got["comm_steps"] == want, (name, stage)
            assert got["param_bytes"] == weight_bytes(model, layout, int(stage)), (name, stage)
            assert got["kv_cache_bytes"] == kv_cache_bytes(
                model, layout, w["batch"], w["prompt_length"] + w["new_tokens"]), (name, stage)
        # the collectives per layer and decode step, by group (the report: the most of any rank)
        want: dict = {}
        for stage in range(layout.pp):
            decode = sum((step_collectives(model, layout, w["batch"], w["prompt_length"], k,
                                           w["new_tokens"], stage)
                          for k in range(1, w["new_tokens"])), Counter())
            for group, calls in calls_by_group(decode, inside=True).items():
                per = calls / ((w["new_tokens"] - 1) * (model.layers // layout.pp))
                want[group] = max(want.get(group, 0.0), per)
        assert report["comm_collectives_per_layer_per_decode_step"] == want, name
        log = (results / "ab" / "cpu_dense" / f"{name}.log").read_text()  # --mxn-log-comm
        assert "[mxn] collectives of rank 0" in log
        assert "[mxn] bytes sent by rank 0 per layer (prefill + all decode steps): layer 1: TP" \
            in log


SAMPLING_FLAGS = ["--temperature", "0.9", "--top_k", "0", "--top_p", "0.95", "--seed", "77",
                  "--return-log-probs"]


def test_generate_samples_the_same_tokens_under_tp4_and_the_grid(cpu_dense_checkpoint, tmp_path):
    """Megatron's sampling flags: the same seed gives the same sampled tokens, texts and
    log-probs under TP=4 and grid 2x2 (prompts of mixed lengths, text out)."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("5 17 260 9 33 1000 4\n871 2 64\n")
    reports = {}
    for layout in ("tp", "grid"):
        out = tmp_path / f"{layout}.json"
        run = torchrun("scripts/generate_mxn.py", 4, [
            "--config", CPU_DENSE, "--layout", layout, "--load", str(cpu_dense_checkpoint),
            "--prompts-file", str(prompts), "--batch-size", "4", "--max-new-tokens", "6",
            "--warmup-steps", "0", *SAMPLING_FLAGS, "--output-json", str(out)],
            tmp_path / layout, timeout=300, metrics=False)
        assert run.returncode == 0, (run.output[-3000:], "".join(run.rank_logs.values())[-3000:])
        reports[layout] = json.loads(out.read_text())
        assert "[generated 1] " in run.rank_logs[0]  # text out, on stdout
    tp, grid = reports["tp"], reports["grid"]
    assert grid["sampling"] == "temperature 0.9, top_k 0, top_p 0.95, seed 77"
    assert grid["tokens_sha256"] == tp["tokens_sha256"]
    assert grid["texts"] == tp["texts"] and grid["lengths"] == tp["lengths"]
    err = max(abs(a - b) for g, t in zip(grid["log_probs"], tp["log_probs"])
              for a, b in zip(g, t))
    assert err <= 1e-5, err
    # NullTokenizer text: the token ids up to each sequence's end of document
    head = grid["tokens_head"][0]
    assert grid["texts"][0] == " ".join(map(str, head[:grid["lengths"][0]]))
    assert grid["generated_token_ids"] == tp["generated_token_ids"]
    assert [len(ids) for ids in grid["generated_token_ids"]] == grid["lengths"]
    assert grid["generated_token_ids"][0] == head[:grid["lengths"][0]]


@pytest.mark.parametrize("flags,rule", [
    (["--num-attention-heads", "4", "--kv-channels", "32"],
     "was saved with num_attention_heads=8, this run asks for num_attention_heads=4"),
    (["--inference-max-requests", "4", "--batch-size", "8"],
     "--batch-size (8) is larger than the KV cache (--inference-max-requests 4)"),
    (["--max-new-tokens", "60"],
     "prompt + new tokens (84) exceed --max-position-embeddings (64)"),
    (["--mxn-dim-slices", "2", "--mxn-attention", "sliced"],
     "holds a model with standard attention, this run asks for sliced over 2 dim slices "
     "attention"),
])
def test_generate_refuses_bad_requests_on_every_rank(cpu_dense_checkpoint, tmp_path, flags,
                                                     rule):
    run = run_ranks_apart("-m megatron_mxn.inference.generate", 2, [
        "--config", CPU_DENSE, "--tensor-model-parallel-size", "2",
        "--load", str(cpu_dense_checkpoint), *flags], tmp_path, timeout=180)
    assert run.returncode != 0
    for rank, log in run.rank_logs.items():
        assert rule in log, (rank, log[-2000:])


def test_generate_refuses_unknown_config_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(open(CPU_DENSE).read().replace("  batch-size: 8", "  batch-sise: 8"))
    run = run_ranks_apart("-m megatron_mxn.inference.generate", 1, ["--config", str(bad)], tmp_path,
                          timeout=120)
    assert run.returncode != 0
    assert "unknown config key 'batch-sise' in" in run.rank_logs[0]
    assert "did you mean 'batch-size'?" in run.rank_logs[0]


def test_generation_job_exits_cleanly_every_time(cpu_dense_checkpoint, tmp_path):
    """Issue 8: a rank that exits with live gloo groups can abort in interpreter shutdown
    after a successful run (one run in a few); every run must exit 0 with its report."""
    for k in range(3):
        report = tmp_path / f"grid{k}.json"
        run = torchrun("scripts/generate_mxn.py", 4, [
            "--config", CPU_DENSE, "--layout", "grid", "--load", str(cpu_dense_checkpoint),
            "--max-new-tokens", "2", "--repeats", "1", "--warmup-steps", "0",
            "--output-json", str(report)], tmp_path / f"run{k}", timeout=180, metrics=False)
        logs = "".join(run.rank_logs.values())
        assert run.returncode == 0, (k, run.output[-3000:], logs[-3000:])
        assert "terminate called" not in logs, k
        assert json.loads(report.read_text())["layout"]["name"] == GRID


def test_kv_budget_ab_runs_the_largest_batch_each_layout_holds(cpu_dense_checkpoint, tmp_path):
    """--kv-budget-mib: each layout runs the batch whose KV cache per rank fits the budget,
    and the cache it measures is the one planned. cpu_dense, prompt 24 + 2 new tokens: TP=4
    keeps 2 * 26 * 16 * 4 B * 4 layers = 13312 B per sequence and rank, the grid 2x2 half."""
    import os
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "ab_compare.py"), "--config", CPU_DENSE,
         "--layouts", "tp,grid", "--load", str(cpu_dense_checkpoint), "--kv-budget-mib", "0.05",
         "--repeats", "1", "--max-new-tokens", "2", "--warmup-steps", "0",
         "--results-dir", str(tmp_path), "--run", "kv"],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    rows = list(csv.DictReader(open(tmp_path / "kv.csv")))
    grid = next(r["layout"] for r in rows if r["layout"].startswith("grid 2x2"))  # (its cache:
    # auto, decided for this workload; both caches hold the same bytes here)
    got = {(r["layout"], r["metric"]): float(r["median"]) for r in rows}
    # 0.05 MiB = 52428 B: TP=4 floor(52428 / 13312) = 3 sequences, the grid floor(/ 6656) = 7
    assert got[("TP=4", "batch")] == 3 and got[(grid, "batch")] == 7
    assert got[("TP=4", "kv_cache_bytes_per_rank")] == 3 * 13312
    assert got[(grid, "kv_cache_bytes_per_rank")] == 7 * 6656
    assert got[(grid, "output_tokens_per_s")] > 0
    md = (tmp_path / "kv.md").read_text()
    assert "| TP=4 | 3 | 39.00 KiB |" in md and f"| {grid} | 7 | 45.50 KiB |" in md
    assert "x2.33 |" in md  # the grid's batch against TP=4's
    assert (tmp_path / "kv.png").read_bytes()[:4] == b"\x89PNG"

