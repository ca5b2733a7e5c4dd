"""Benchmark one transformer layer (forward + backward) under TP and the grid's schedules.

    python scripts/bench_attention.py [--world 4] [--seqs 1024,2048,4096,8192,16384]

On N gloo ranks on CPU (one GPU: scripts/gpu_check.sh checks the kernels and one rank's share), for
megatron-core's own attention at TP=N (its unfused core, and `TP=N fused`: the same layout on
the plugin's fused kernels, --mxn-tp-core fused) and every grid n x m of N ranks under each
exact schedule:
time of forward + backward (min and median of --repeats), peak memory growth per rank (max over
ranks) and bytes each rank sends. Ratios are taken against TP=N and TP=N fused in the same run. Layouts whose
s_q x s_k score matrices would not fit (--score-budget-gib per rank) are skipped and said so.
Writes a Markdown table (--out PREFIX.md) and a PNG of time and memory against s (PREFIX.png).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_mxn.attention.schedules import AUTO, EXACT_SCHEDULES, get_schedule  # noqa: E402

SCHEDULES = tuple(name for name in EXACT_SCHEDULES if name != AUTO)  # exact, gather, seq


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--world", type=int, default=4, help="ranks (CPU: gloo processes)")
    p.add_argument("--seqs", default="1024,2048,4096,8192,16384")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--layouts", default=None,
                   help="comma-separated, e.g. tp,tp_fused,2x2:seq,1x4:seq (default: TP, TP "
                        "fused and every grid under each schedule)")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32")
    p.add_argument("--score-budget-gib", type=float, default=1.5,
                   help="skip a layout whose fp32 scores would exceed this per rank")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--out", default="results/bench_attention")
    return p.parse_args(argv)


def layouts(world: int, spec: str = None):
    """[(name, n, m, schedule)]: TP=world (megatron's core, then the fused core) first, then
    grids n x m (m > 1) per schedule."""
    tp = [(f"TP={world}", world, 1, "exact"), (f"TP={world} fused", world, 1, "fused")]
    if spec:
        out = []
        for item in spec.split(","):
            if item == "tp":
                out.append(tp[0])
            elif item == "tp_fused":
                out.append(tp[1])
            else:
                grid, schedule = item.split(":")
                n, m = map(int, grid.split("x"))
                out.append((f"grid {n}x{m} {schedule}", n, m, schedule))
        return out
    return tp + [
        (f"grid {world // m}x{m} {s}", world // m, m, s)
        for m in range(2, world + 1) if world % m == 0 for s in SCHEDULES]


def score_bytes(args, n: int, m: int, schedule: str, s: int) -> float:
    """Per-rank fp32 scores the layout materialises (0 for the fused sequence-split core and
    the fused TP core)."""
    if schedule == "fused" or (m > 1 and not get_schedule(schedule).builds_scores):
        return 0.0
    return args.batch * args.heads // n * s * s * 4.0


def _peak_reset() -> int:
    """Free what the allocator holds, reset the peak RSS to the current RSS; return it."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    return _vm("VmHWM")


def _vm(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def run_rank(args):
    """On every rank: each layout and length; per-rank (time list, memory growth, bytes)."""
    import torch
    import torch.distributed as dist

    import megatron_mxn
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from megatron.core.transformer.transformer_block import TransformerBlock

    from megatron_mxn.accounting import CommCounter, group_labels
    from megatron_mxn.attention.spec import get_fused_tp_layer_spec

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    device = "cuda" if args.device == "cuda" else "cpu"
    hidden = args.heads * args.head_dim
    rows = []
    for s in map(int, args.seqs.split(",")):
        for name, n, m, schedule in layouts(args.world, args.layouts):
            if score_bytes(args, n, m, schedule, s) > args.score_budget_gib * 2**30:
                rows.append({"layout": name, "s": s, "skipped": True})
                continue
            pgs = megatron_mxn.initialize_mxn_parallel(n, m, create_gloo_process_groups=False)
            model_parallel_cuda_manual_seed(1234)
            config = megatron_mxn.MxnTransformerConfig(
                num_layers=1, hidden_size=hidden, ffn_hidden_size=4 * hidden,
                num_attention_heads=args.heads, num_query_groups=args.kv_heads,
                kv_channels=args.head_dim, tensor_model_parallel_size=n * m, mxn_dim_slices=m,
                mxn_attention=schedule if m > 1 else "auto", params_dtype=dtype, bf16=args.dtype == "bf16",
                fp16=args.dtype == "fp16", hidden_dropout=0.0, attention_dropout=0.0,
                use_cpu_initialization=device == "cpu")
            spec = get_gpt_layer_local_spec()
            if m > 1:
                spec = megatron_mxn.get_mxn_layer_spec(spec, rotary_percent=0.0)
            elif schedule == "fused":
                spec = get_fused_tp_layer_spec(spec)
            block = TransformerBlock(config, spec, pg_collection=pgs).to(device)
            x = torch.randn(s, args.batch, hidden, dtype=dtype, device=device,
                            requires_grad=True)
            times = []
            with CommCounter(group_labels()) as counter:
                for k in range(args.repeats + 1):  # the first is a warm-up
                    if k == 1:
                        counter.reset()
                        base = _peak_reset()
                    dist.barrier()
                    if device == "cuda":
                        torch.cuda.synchronize()
                        torch.cuda.reset_peak_memory_stats()
                        base = torch.cuda.memory_allocated()
                    start = time.perf_counter()
                    block(x, attention_mask=None).float().sum().backward()
                    if device == "cuda":
                        torch.cuda.synchronize()
                    times.append(time.perf_counter() - start)
                    x.grad = None
                    block.zero_grad(set_to_none=True)
            grow = (torch.cuda.max_memory_allocated() if device == "cuda" else _vm("VmHWM")) - base
            sent = sum(r.sent_bytes * c for r, c in counter.counts.items()) / args.repeats
            rows.append({"layout": name, "s": s, "times": times[1:], "grow": grow,
                         "sent": sent})
            del block, x
            megatron_mxn.destroy_mxn_parallel(destroy_model_parallel=True)
    return rows


def merge(per_rank):
    """Per (layout, s): the slowest rank's median and min time, the largest memory growth
    and bytes sent of any rank."""
    out = []
    for k, row in enumerate(per_rank[0]):
        if row.get("skipped"):
            out.append(row)
            continue
        ranks = [r[k] for r in per_rank]
        medians = [statistics.median(r["times"]) for r in ranks]
        out.append({"layout": row["layout"], "s": row["s"], "median_s": max(medians),
                    "min_s": max(min(r["times"]) for r in ranks),
                    "grow": max(r["grow"] for r in ranks), "sent": max(r["sent"] for r in ranks)})
    return out


def table(rows, args) -> str:
    from megatron_mxn.accounting import format_bytes

    lines = [f"One transformer layer (h={args.heads}, g={args.kv_heads}, d={args.head_dim}, "
             f"hidden {args.heads * args.head_dim}, batch {args.batch}, {args.dtype}, causal, no "
             f"mask tensor), forward + backward, {args.world} ranks on {args.device}; "
             f"{args.repeats} timed repeats after one warm-up; time: slowest rank's median "
             "[min]; memory: peak growth per rank during the timed repeats; ratios against "
             f"TP={args.world} (megatron-core's unfused core) and TP={args.world} fused (the same "
             "layout on the plugin's fused kernels) at the same s.", "",
             "| s | layout | time (s) | time / TP | time / TP fused | peak memory growth / rank "
             "| memory / TP | memory / TP fused | sent / rank / step |",
             "|---|---|---|---|---|---|---|---|---|"]
    ref = {r["s"]: r for r in rows if r["layout"] == f"TP={args.world}" and "median_s" in r}
    fused = {r["s"]: r for r in rows
             if r["layout"] == f"TP={args.world} fused" and "median_s" in r}
    for r in rows:
        if r.get("skipped"):
            lines.append(f"| {r['s']} | {r['layout']} | skipped: its s x s scores exceed "
                         f"{args.score_budget_gib} GiB / rank | | | | | | |")
            continue

        def ratios(base):
            t = f"{r['median_s'] / base['median_s']:.2f}x" if base else "-"
            m = f"{r['grow'] / base['grow']:.2f}x" if base and base["grow"] > 0 else "-"
            return t, m

        (t_tp, m_tp), (t_fused, m_fused) = ratios(ref.get(r["s"])), ratios(fused.get(r["s"]))
        lines.append(f"| {r['s']} | {r['layout']} | {r['median_s']:.2f} [{r['min_s']:.2f}] | "
                     f"{t_tp} | {t_fused} | {format_bytes(r['grow'], smallest='MiB')} | {m_tp} "
                     f"| {m_fused} | {format_bytes(r['sent'], smallest='MiB')} |")
    return "\n".join(lines)


def chart(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4))
    for name in dict.fromkeys(r["layout"] for r in rows):
        pts = [r for r in rows if r["layout"] == name and "median_s" in r]
        if pts:
            xs = [r["s"] for r in pts]
            ax_t.plot(xs, [r["median_s"] for r in pts], marker="o", label=name)
            ax_m.plot(xs, [r["grow"] / 2**20 for r in pts], marker="o", label=name)
    for ax, what in ((ax_t, "forward + backward time (s)"), (ax_m, "peak memory growth / rank (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length s")
        ax.set_ylabel(what)
        ax.grid(True, alpha=0.3)
    ax_m.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cuda":
        raise SystemExit("--device cuda: the layer benchmark needs N ranks; on one GPU run "
                         "scripts/gpu_check.sh (kernels and one rank's share of the core)")
    from megatron_mxn.cpu.launch import run_on_cpu_ranks

    print(f"[bench] {len(layouts(args.world, args.layouts))} layouts x s in {args.seqs} on "
          f"{args.world} CPU ranks ...", flush=True)
    rows = merge(run_on_cpu_ranks(args.world, run_rank, args))
    text = table(rows, args)
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(
        f"`python scripts/bench_attention.py {' '.join(sys.argv[1:] if argv is None else argv)}`"
        f"\n\n{text}\n")
    chart(rows, out.with_suffix(".png"))
    print(f"wrote {out.with_suffix('.md')} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
