"""The measurement and report of a generation run (megatron_mxn.inference.generate builds and
loads the model, then hands it here): an untimed warm-up, `--repeats` timed generations (the
first counted collective by collective), every rank's numbers gathered, and rank 0's report as
JSON (`--output-json`) and as a table (`format_report`): time to first token, time per output
token (mean, median, p90), output and total tokens/s, KV-cache bytes and peak memory per rank,
and the bytes each group sends and the collectives it issues per layer and decode step."""

from __future__ import annotations

import hashlib
import time
from collections import Counter

from megatron_mxn.accounting import (
    CommCounter,
    bytes_by_layer,
    calls_by_group,
    count_rows,
    counts_table,
    format_bytes,
    format_calls,
    group_labels,
    sent_bytes_by_group,
)

# The modules that import megatron are imported inside the functions (they run after
# the entry point has enabled CPU mode).


def benchmark(gen, args, cpu: bool, model, pgs, prompt, micro: int, options: dict, tokenizer):
    """Warm up, generate `gen.repeats` times with generate()'s `options` (its kv_cache
    resolved), gather every rank's numbers; rank 0 returns the report, the others None."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.utils import unwrap_model

    from megatron_mxn.inference.generation import generate, peak_memory_bytes, summarize

    kv_cache = options["kv_cache"]
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    if gen.warmup_steps:
        generate(model, prompt, min(gen.warmup_steps, gen.max_new_tokens), pgs, micro,
                 **options)

    layers = unwrap_model(model).decoder.layers
    last_rank = dist.get_world_size() - 1

    def progress(step, repeat):
        if (dist.get_rank() == last_rank and step and gen.progress_interval
                and step % gen.progress_interval == 0):
            print(f"  repeat {repeat + 1}/{gen.repeats}: decode step "
                  f"{step}/{gen.max_new_tokens - 1}", flush=True)

    # The first timed generation is counted step by step; the others are only timed.
    runs, per_step, layer_bytes, seconds = [], [], Counter(), []
    cpu_marks = [time.process_time()]  # this process's CPU time at the end of each step
    with CommCounter(group_labels()) as counter:
        counter.mark_inside(layers)

        def end_of_step():
            layer_bytes.update(counter.layer_bytes)
            per_step.append(counter.reset())
            seconds.append(counter.reset_seconds())
            cpu_marks.append(time.process_time())

        def before_step(step):
            if step > 0:
                end_of_step()
            progress(step, 0)

        runs.append(generate(model, prompt, gen.max_new_tokens, pgs, micro,
                             before_step=before_step, **options))
        end_of_step()
    for repeat in range(1, gen.repeats):
        runs.append(generate(model, prompt, gen.max_new_tokens, pgs, micro,
                             before_step=lambda step, repeat=repeat: progress(step, repeat),
                             **options))
    decode = sum(per_step[1:], Counter())
    decode_seconds = sum(seconds[1:], Counter())
    if args.mxn_log_comm:
        _print_comm(per_step, decode, len(layers), gen.max_new_tokens - 1,
                    bytes_by_layer(layer_bytes))
    # (prompts of different lengths add decode steps: generate() feeds the longer prompts'
    # tokens one step at a time after prefilling the shortest)
    decode_steps = max(len(per_step) - 1, 1)
    mine = {
        "rank": dist.get_rank(),
        "stage": parallel_state.get_pipeline_model_parallel_rank(),
        "last_stage": parallel_state.is_pipeline_last_stage(),
        "param_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
        "comm_steps": [count_rows(counts) for counts in per_step],
        "kv_cache_bytes": runs[0].kv_cache_bytes,
        "peak_memory_bytes": peak_memory_bytes(),
        "comm_per_layer": {k: v / (decode_steps * len(layers))
                           for k, v in sent_bytes_by_group(decode, inside=True).items()},
        "calls_per_layer": {k: v / (decode_steps * len(layers))
                            for k, v in calls_by_group(decode, inside=True).items()},
        "comm_per_step_outside_layers": {
            k: v / decode_steps for k, v in sent_bytes_by_group(decode, inside=False).items()},
        "comm_s_per_step": {f"{g}{'' if inside else ' (outside layers)'}": v / decode_steps
                            for (g, inside), v in decode_seconds.items()},
        "cpu_s_per_step": (cpu_marks[-1] - cpu_marks[1]) / max(len(cpu_marks) - 2, 1),
        "ttft_s": [r.ttft_s for r in runs],
        "tpot_s": [t for r in runs for t in r.tpot_s],
        "tpot_runs": [r.tpot_s for r in runs],
        "total_s": [r.step_end_s[-1] for r in runs],
        "tokens_sha256": (hashlib.sha256(runs[0].tokens.numpy().tobytes()).hexdigest()
                          if runs[0].tokens.numel() else None),
        "tokens_head": runs[0].tokens[:2].tolist() if runs[0].tokens.numel() else None,
        **_outputs(runs[0], tokenizer),
    }
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    if dist.get_rank() != 0:
        return None
    last = [r for r in everyone if r["last_stage"]][0]
    b, new = gen.batch_size, gen.max_new_tokens
    total = summarize(last["total_s"])["median"]
    per_repeat = [{"ttft_s": ttft, "tpot_s": summarize(last["tpot_runs"][k]),
                   "output_tokens_per_s": b * new / t,
                   "total_tokens_per_s": b * (prompt.shape[1] + new) / t}
                  for k, (ttft, t) in enumerate(zip(last["ttft_s"], last["total_s"]))]
    return {
        "layout": {"tp": args.tensor_model_parallel_size, "pp": args.pipeline_model_parallel_size,
                   "dp": args.data_parallel_size, "head_groups": args.mxn_head_groups,
                   "dim_slices": args.mxn_dim_slices, "world": args.world_size,
                   "expert_parallel": args.expert_model_parallel_size,
                   "name": layout_name(args, kv_cache)},
        "workload": {"batch": b, "prompt_length": prompt.shape[1], "new_tokens": new,
                     "micro_batches": micro, "repeats": gen.repeats,
                     "warmup": f"{1 if gen.warmup_steps else 0} untimed generation of "
                               f"{min(gen.warmup_steps, new)} tokens before the timed ones",
                     "device": "cpu (gloo)" if cpu else torch.cuda.get_device_name()},
        "ttft_s": summarize(last["ttft_s"]),
        "tpot_s": summarize(last["tpot_s"]),
        "output_tokens_per_s": b * new / total,
        "total_tokens_per_s": b * (prompt.shape[1] + new) / total,
        "kv_cache_bytes_per_rank": max(r["kv_cache_bytes"] for r in everyone),
        "peak_memory_bytes_per_rank": max(r["peak_memory_bytes"] for r in everyone),
        "peak_memory_kind": "CUDA peak allocated" if not cpu else "peak RSS of the process",
        "comm_bytes_per_layer_per_decode_step": _max_by_key(r["comm_per_layer"] for r in everyone),
        "comm_collectives_per_layer_per_decode_step": _max_by_key(
            r["calls_per_layer"] for r in everyone),
        "comm_bytes_per_decode_step_outside_layers": _max_by_key(
            r["comm_per_step_outside_layers"] for r in everyone),
        # the wall time inside collectives per decode step (first timed generation), by group:
        # the rank that spent the most; TPOT minus their sum is roughly its compute
        "comm_seconds_per_decode_step": _max_by_key(r["comm_s_per_step"] for r in everyone),
        "comm_seconds_per_decode_step_total": max(sum(r["comm_s_per_step"].values())
                                                  for r in everyone),
        # CPU time of each rank's process (its threads, gloo's included) per decode step
        "cpu_seconds_per_decode_step": [r["cpu_s_per_step"] for r in everyone],
        "tokens_sha256": last["tokens_sha256"],
        "tokens_head": last["tokens_head"],
        "sampling": describe_sampling(gen, args.seed),
        "texts": last["texts"],
        "generated_token_ids": last["generated_token_ids"],
        "lengths": last["lengths"],
        "log_probs": last["log_probs"],
        "repeats": per_repeat,
        "schedule": args.mxn_attention,
        "kv_cache": kv_cache,
        "kv_cache_requested": gen.mxn_kv_cache,
        "per_stage": {str(r["stage"]): {k: r[k] for k in ("rank", "param_bytes", "kv_cache_bytes",
                                                          "comm_steps")}
                      for r in reversed(everyone)},  # (the stage's first rank wins)
    }


def _outputs(run, tokenizer) -> dict:
    """The last stage's generations: each sequence's text up to its end-of-document token
    (detokenized by megatron's controller helper), its token ids (the same tokens; the prompt
    excluded), its length, its tokens' log-probs."""
    from megatron.core.inference.text_generation_controllers.text_generation_controller import (
        TextGenerationController,
    )

    if not run.tokens.numel():
        return {"texts": None, "generated_token_ids": None, "lengths": None, "log_probs": None}
    rows = [row[:n] for row, n in zip(run.tokens.tolist(), run.lengths)]
    return {
        "texts": [TextGenerationController.detokenize(tokenizer(), row) for row in rows],
        "generated_token_ids": rows,
        "lengths": run.lengths,
        "log_probs": run.log_probs.tolist() if run.log_probs is not None else None,
    }


def describe_sampling(gen, seed: int) -> str:
    """'greedy', or the sampling flags and seed (Megatron's: top_k 1 or temperature 0 is
    greedy)."""
    if gen.top_k == 1 or gen.temperature == 0.0:
        return "greedy"
    return (f"temperature {gen.temperature}, top_k {gen.top_k}, top_p {gen.top_p}, "
            f"seed {seed}")


def _print_comm(per_step, decode, layers: int, decode_steps: int, layer_bytes) -> None:
    """--mxn-log-comm: every collective of the prefill and of the decode steps (per step),
    and the bytes each layer sent by group over the whole generation."""
    import torch.distributed as dist

    for rank in range(dist.get_world_size()):
        if rank == dist.get_rank():
            print(f"[mxn] collectives of rank {rank} ({layers} layers on this rank), prefill:\n"
                  f"{counts_table(per_step[0])}", flush=True)
            if decode_steps:
                print(f"[mxn] collectives of rank {rank}, per decode step (mean of "
                      f"{decode_steps}):\n{counts_table(decode, per=decode_steps)}", flush=True)
            print(f"[mxn] bytes sent by rank {rank} per layer (prefill + all decode steps): "
                  + "; ".join(f"layer {n}: " + ", ".join(f"{g} {b:.0f}" for g, b in by.items())
                              for n, by in layer_bytes.items()), flush=True)
        dist.barrier()


def layout_name(args, kv_cache: str = "dims") -> str:
    from megatron_mxn.attention.mla_decode import LATENT_POSITIONS
    from megatron_mxn.attention.schedules import AUTO, get_kv_cache

    pp = f" PP={args.pipeline_model_parallel_size}" if args.pipeline_model_parallel_size > 1 else ""
    if args.mxn_dim_slices > 1:
        schedule = "" if args.mxn_attention == AUTO else f" {args.mxn_attention}"
        cache = (LATENT_POSITIONS if kv_cache == LATENT_POSITIONS.name  # (MLA's one cache)
                 else get_kv_cache(kv_cache)).label  # (as cost_model.Layout.name)
        return f"grid {args.mxn_head_groups}x{args.mxn_dim_slices}{pp}{schedule}{cache}"
    core = " fused" if getattr(args, "mxn_tp_core", "megatron") == "fused" else ""
    return f"TP={args.tensor_model_parallel_size}{pp}{core}"


def _max_by_key(dicts) -> dict:
    out: dict = {}
    for d in dicts:
        for k, v in d.items():
            out[k] = max(out.get(k, 0.0), v)
    return dict(sorted(out.items()))


def comm_time(r: dict) -> str:
    """The wall time a decode step spent inside collectives (total: the busiest rank), by
    group, in ms; '' for a report without it."""
    by_group = r.get("comm_seconds_per_decode_step")
    if by_group is None:
        return ""
    return (f"{r['comm_seconds_per_decode_step_total'] * 1e3:.1f} ms ("
            + ", ".join(f"{g} {v * 1e3:.1f}" for g, v in by_group.items()) + ")")


def cpu_time(r: dict) -> str:
    """The CPU time of a decode step, summed over the ranks and of the busiest rank, in ms;
    '' for a report without it. With more ranks than cores, the sum over the cores bounds
    the TPOT from below."""
    per_rank = r.get("cpu_seconds_per_decode_step")
    if not per_rank:
        return ""
    return f"{sum(per_rank) * 1e3:.1f} ms (busiest rank {max(per_rank) * 1e3:.1f})"


def format_report(r: dict) -> str:
    w = r["workload"]
    ms = 1000.0
    comm = ", ".join(f"{k} {format_bytes(v)}" for k, v in
                     r["comm_bytes_per_layer_per_decode_step"].items()) or "none"
    outside = ", ".join(f"{k} {format_bytes(v)}" for k, v in
                        r["comm_bytes_per_decode_step_outside_layers"].items()) or "none"
    rows = [
        ("layout", f"{r['layout']['name']} ({r['layout']['world']} ranks, DP "
                   f"{r['layout']['dp']})"),
        ("workload", f"batch {w['batch']}, prompt {w['prompt_length']}, {w['new_tokens']} new "
                     f"tokens, {w['micro_batches']} micro-batch(es), {w['repeats']} timed "
                     f"repeat(s), {w['device']}"),
        ("warm-up (excluded)", w["warmup"]),
        ("sampling", r["sampling"]),
        ("time to first token", f"{r['ttft_s']['median'] * ms:.1f} ms (median)"),
        ("time per output token", f"mean {r['tpot_s']['mean'] * ms:.2f} ms, median "
                                  f"{r['tpot_s']['median'] * ms:.2f} ms, p90 "
                                  f"{r['tpot_s']['p90'] * ms:.2f} ms"),
        ("output tokens/s", f"{r['output_tokens_per_s']:.1f}"),
        ("total tokens/s", f"{r['total_tokens_per_s']:.1f}"),
        ("KV cache / rank", format_bytes(r["kv_cache_bytes_per_rank"])),
        ("peak memory / rank", f"{format_bytes(r['peak_memory_bytes_per_rank'])} "
                               f"({r['peak_memory_kind']})"),
        ("sent / layer / decode step / rank", comm),
        ("collectives / layer / decode step", format_calls(
            r["comm_collectives_per_layer_per_decode_step"])),
        ("sent / decode step outside layers", outside),
        ("in collectives / decode step", comm_time(r)),
        ("CPU time / decode step", cpu_time(r)),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(["| metric | value |", "|---|---|"]
                     + [f"| {k.ljust(width)} | {v} |" for k, v in rows])
