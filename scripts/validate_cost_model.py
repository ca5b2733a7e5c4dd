"""Check the cost model against measurement: `python scripts/validate_cost_model.py`.

For each layout of a CPU config (each grid schedule too) and each prompt length, one real
generation (megatron_mxn.inference.generate on 4 gloo ranks, the same checkpoint) reports every collective
of every step, the parameter bytes and the KV-cache bytes of each pipeline stage; the cost model
(megatron_mxn.analysis.cost_model) predicts the same from the config alone. Bytes and memory must agree
exactly; the planner's predicted TPOT ranking of the layouts is compared with the measured
ranking (reported, not asserted: CPU timings are noisy). Writes <results-dir>/validate_cost_model.md.
"""

import argparse
import json
import os
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_mxn.tools.ab_compare import Launcher, make_checkpoint, run_job  # noqa: E402
from megatron_mxn.accounting import count_rows  # noqa: E402
from megatron_mxn.megatron_lm.run_configs import load_config  # noqa: E402
from megatron_mxn.analysis.cost_model import (  # noqa: E402
    ModelShape,
    kv_cache_bytes,
    step_collectives,
    weight_bytes,
)
from megatron_mxn.analysis.planner import PRESETS, Workload, config_layouts, predict  # noqa: E402


def predicted_rows(model, layout, batch, prompt, new, stage):
    """Every step's predicted collectives, as the generation report stores the measured."""
    return [count_rows(step_collectives(model, layout, batch, prompt, k, new, stage))
            for k in range(new)]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/cpu_dense.yaml")
    p.add_argument("--prompts", default="16,48", help="prompt lengths (comma-separated)")
    p.add_argument("--new-tokens", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--results-dir", default="results")
    p.add_argument("--load", default=None, help="checkpoint (default: pretrain one)")
    p.add_argument("--reuse", action="store_true",
                   help="reuse the reports of a previous run (re-predict only)")
    args = p.parse_args()
    cfg = load_config(args.config)
    model = ModelShape.from_flags(cfg["model"])
    cluster = PRESETS[(cfg.get("cluster") or {}).get("preset", "cpu-gloo")]
    batch = int((cfg.get("inference") or {}).get("batch-size", 8))
    work_dir = Path(args.results_dir) / "validate_cost_model"
    work_dir.mkdir(parents=True, exist_ok=True)
    launcher = Launcher("torchrun", 1, cluster.gpus_per_node)
    ckpt = args.load or str(make_checkpoint(args.config, work_dir, launcher, 3600))
    lines = ["# Cost model vs measurement", "",
             f"`python scripts/validate_cost_model.py --config {args.config} --prompts "
             f"{args.prompts} --new-tokens {args.new_tokens} --repeats {args.repeats}`", "",
             "| prompt | layout | collectives (all steps, all stages) | weights / rank | "
             "KV cache / rank | measured TPOT ms | predicted TPOT ms |",
             "|---|---|---|---|---|---|---|"]
    exact_all, rankings = True, []
    for prompt in map(int, args.prompts.split(",")):
        measured_t, predicted_t = {}, {}
        for name, layouts in config_layouts(cfg, cluster.gpus).items():
            for layout in layouts:
                tag = f"{name}-{layout.schedule}-p{prompt}"
                report_path = work_dir / f"{tag}.json"
                cmd = launcher.command([
                    "-m", "megatron_mxn.inference.generate", "--config", args.config, "--layout", name,
                    "--load", ckpt, "--mxn-attention", layout.schedule, "--prompt-length",
                    str(prompt), "--max-new-tokens", str(args.new_tokens), "--repeats",
                    str(args.repeats), "--output-json", str(report_path)])
                reuse = args.reuse and report_path.exists()
                if not reuse and not run_job(cmd, work_dir / f"{tag}.log", tag, 1800):
                    lines.append(f"| {prompt} | {layout.name} | run FAILED | | | | |")
                    exact_all = False
                    continue
                report = json.loads(report_path.read_text())
                micro = report["workload"]["micro_batches"]
                layout = replace(layout, micro_batches=micro, kv_cache=report["kv_cache"])
                ok_comm = ok_w = ok_kv = True
                for stage, got in report["per_stage"].items():
                    stage = int(stage)
                    want = predicted_rows(model, layout, batch, prompt, args.new_tokens, stage)
                    ok_comm &= got["comm_steps"] == want
                    ok_w &= got["param_bytes"] == weight_bytes(model, layout, stage)
                    ok_kv &= got["kv_cache_bytes"] == kv_cache_bytes(
                        model, layout, batch, prompt + args.new_tokens)
                exact_all &= ok_comm and ok_w and ok_kv
                tpot = report["tpot_s"]["median"]
                pred = predict(model, layout, cluster, Workload(
                    "infer", batch, prompt, args.new_tokens)).tpot_s
                measured_t[layout.name], predicted_t[layout.name] = tpot, pred
                lines.append(
                    f"| {prompt} | {layout.name} | {'exact' if ok_comm else 'DIFFERENT'} | "
                    f"{'exact' if ok_w else 'DIFFERENT'} | {'exact' if ok_kv else 'DIFFERENT'}"
                    f" | {tpot * 1e3:.1f} | {pred * 1e3:.1f} |")
        by_measured = sorted(measured_t, key=measured_t.get)
        by_predicted = sorted(predicted_t, key=predicted_t.get)
        pairs = [(a, b) for i, a in enumerate(by_measured) for b in by_measured[i + 1:]]
        agree = sum(by_predicted.index(a) < by_predicted.index(b) for a, b in pairs)
        rankings.append(f"prompt {prompt}: measured TPOT order {by_measured}; predicted "
                        f"{by_predicted}; {agree}/{len(pairs)} pairs in the same order.")
    lines += ["", *rankings, "",
              f"Bytes and memory: {'all exact' if exact_all else 'MISMATCHES (see above)'}."]
    out = Path(args.results_dir) / "validate_cost_model.md"
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {out}")
    return 0 if exact_all else 1


if __name__ == "__main__":
    sys.exit(main())
