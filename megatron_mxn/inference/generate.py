"""Batched generation (greedy, or sampled with Megatron's --temperature/--top_k/--top_p) from a
Megatron checkpoint under a grid x PP or TP x PP layout.

    torchrun --nproc-per-node 4 -m megatron_mxn.inference.generate --load CKPT [Megatron model flags]
        [--mxn-head-groups N --mxn-dim-slices M | --tensor-model-parallel-size T]
        [--pipeline-model-parallel-size P] --batch-size B --prompt-length L --max-new-tokens K

(or `--config configs/x.yaml --layout NAME` for the model, workload and layout flags). The
checkpoint may have been saved under any layout. Reports, as a table and as JSON
(`--output-json`): time to first token, time per output token (mean, median, p90), output and
total tokens/s, KV-cache bytes and peak memory per rank, and the bytes each group sends per
layer and decode step. Warm-up generations are excluded from every timing and stated.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections import Counter
from typing import List

from megatron_mxn.analysis.accounting import (
    CommCounter,
    bytes_by_layer,
    count_rows,
    counts_table,
    format_bytes,
    group_labels,
    sent_bytes_by_group,
)
from megatron_mxn.grid.layout import MxnConfigError
from megatron_mxn.megatron_lm import add_mxn_args, check_checkpoint_args, with_mxn_args
from megatron_mxn.megatron_lm.entry import install
from megatron_mxn.megatron_lm.flags import GENERATE
from megatron_mxn.megatron_lm.model_config import (
    initialize_grid_after_megatron,
    mxn_gpt_config_from_args,
)
from megatron_mxn.megatron_lm.run_configs import (
    expand_config_args,
    generation_option_strings,
    megatron_option_strings,
)

# Imported before CPU mode is enabled (main enables it): the modules that import megatron are
# imported inside the functions that run after it.


def split_argv(argv: List[str]):
    """(generation options, remaining Megatron argv), after expanding --config/--layout."""
    known = megatron_option_strings(add_mxn_args) | generation_option_strings()
    argv = expand_config_args(argv, known, section="inference")
    return GENERATE.parse_known_args(argv)


def check_request(gen, args) -> None:
    """Bad requests fail here, identically on every rank, before any collective."""
    for name in ("batch_size", "max_new_tokens", "prompt_length", "repeats"):
        if getattr(gen, name) < 1:
            raise MxnConfigError(f"--{name.replace('_', '-')} must be >= 1")
    explicit = set(sys.argv)
    if "--inference-max-requests" in explicit and gen.batch_size > args.inference_max_requests:
        raise MxnConfigError(
            f"--batch-size ({gen.batch_size}) is larger than the KV cache "
            f"(--inference-max-requests {args.inference_max_requests})")
    total = gen.prompt_length + gen.max_new_tokens
    if "--inference-max-seq-length" in explicit and total > args.inference_max_seq_length:
        raise MxnConfigError(
            f"prompt + new tokens ({gen.prompt_length} + {gen.max_new_tokens}) exceed the KV "
            f"cache (--inference-max-seq-length {args.inference_max_seq_length})")
    if total > args.max_position_embeddings:
        raise MxnConfigError(f"prompt + new tokens ({total}) exceed --max-position-embeddings "
                             f"({args.max_position_embeddings})")
    micro = gen.inference_micro_batches or args.pipeline_model_parallel_size
    if gen.batch_size % micro:
        raise MxnConfigError(f"--batch-size ({gen.batch_size}) must be divisible by the "
                             f"inference micro-batches ({micro})")
    if args.load is None:
        raise MxnConfigError("--load CHECKPOINT is required: generation compares layouts on "
                             "the same weights")
    check_sampling(gen)
    check_checkpoint_args(args)
    if args.hybrid_layer_pattern is not None:  # Mamba layers on CPU are refused here
        from megatron_mxn.attention.hybrid_spec import check_hybrid_pattern  # (megatron)

        check_hybrid_pattern(args.hybrid_layer_pattern)


def model_builder(args):
    """(model config, builder) for the checkpoint's model: megatron's HybridModel when
    `--hybrid-layer-pattern` is given (Megatron's own test, is_hybrid_model), else GPTModel;
    both with the grid."""
    from megatron.training.utils import is_hybrid_model

    if is_hybrid_model(args):
        from megatron_mxn.megatron_lm.hybrid_config import (  # (megatron.training)
            MxnHybridModelBuilder,
            mxn_hybrid_config_from_args,
        )

        return mxn_hybrid_config_from_args(args), MxnHybridModelBuilder
    from megatron.training.models.gpt import GPTModelBuilder

    return mxn_gpt_config_from_args(args), GPTModelBuilder


def check_sampling(gen) -> None:
    """The sampling flags, with Megatron's rule that top-k and top-p exclude each other."""
    if gen.temperature < 0 or gen.top_k < 0 or not 0.0 <= gen.top_p <= 1.0:
        raise MxnConfigError("sampling needs --temperature >= 0, --top_k >= 0 and --top_p in "
                             "[0, 1]")
    if gen.top_k > 0 and gen.top_p > 0.0:
        raise MxnConfigError(f"--top_k ({gen.top_k}) and --top_p ({gen.top_p}) cannot both be "
                             "set (Megatron's rule): pass --top_k 0 with --top_p")


def read_prompts(gen, args, tokenizer_fn):
    """([batch, longest] prompt token ids, right-padded; each prompt's length or None when
    they are all equal), identical on every rank."""
    import torch

    if gen.prompts_file is None:
        vocab = args.padded_vocab_size if args.padded_vocab_size else 1024
        g = torch.Generator().manual_seed(gen.prompt_seed)
        return torch.randint(0, min(vocab, getattr(args, "vocab_size", vocab) or vocab),
                             (gen.batch_size, gen.prompt_length), generator=g), None
    rows = []
    for line in open(gen.prompts_file):
        line = line.strip()
        if not line:
            continue
        parts = line.split()
        rows.append([int(t) for t in parts] if all(p.isdigit() for p in parts)
                    else list(tokenizer_fn().tokenize(line)))
    if not rows:
        raise MxnConfigError(f"{gen.prompts_file} holds no prompt")
    rows = [rows[k % len(rows)] for k in range(gen.batch_size)]
    longest = max(len(r) for r in rows)
    return (torch.tensor([r + [0] * (longest - len(r)) for r in rows]),
            [len(r) for r in rows])


def main(argv=None) -> None:
    cpu = install()  # CPU mode (or the wheel fixes) and the grid's hooks, before megatron
    gen, megatron_argv = split_argv(sys.argv[1:] if argv is None else argv)
    sys.argv = [sys.argv[0], *megatron_argv]

    from megatron.training.arguments import parse_and_validate_args

    args = parse_and_validate_args(
        extra_args_provider=with_mxn_args(),
        args_defaults={"no_load_rng": True, "no_load_optim": True, "micro_batch_size": 1,
                       "exit_on_missing_checkpoint": True, "tokenizer_type": "NullTokenizer"})
    check_request(gen, args)
    from megatron_mxn.grid.groups import clean_shutdown  # (megatron)

    with clean_shutdown():  # (process groups destroyed before Python exits)
        report = run(gen, args, cpu)
        if report is not None:
            print(format_report(report), flush=True)
            if gen.prompts_file:  # text in, text out
                for k, text in enumerate(report["texts"]):
                    print(f"[generated {k}] {text}", flush=True)
            if gen.output_json:
                with open(gen.output_json, "w") as f:
                    json.dump(report, f, indent=1)


def run(gen, args, cpu: bool):
    """Initialize Megatron, build and load the model, generate; rank 0 returns the report."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.inference.sampling_params import SamplingParams
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.training.checkpointing import load_checkpoint
    from megatron.training.initialize import initialize_megatron
    from megatron.core.utils import unwrap_model

    from megatron_mxn.grid.groups import mxn_parallel_is_initialized  # (megatron)
    from megatron_mxn.inference.generation import generate, peak_memory_bytes, summarize

    initialize_megatron(allow_no_cuda=cpu)
    pgs = ProcessGroupCollection.use_mpu_process_groups()
    model_cfg, builder = model_builder(args)
    if not mxn_parallel_is_initialized():  # (the grid's layer spec would do it for m > 1)
        initialize_grid_after_megatron(args.mxn_head_groups, args.mxn_dim_slices,
                                       announce=args.mxn_dim_slices > 1)
    chunks = builder(model_cfg).build_distributed_models(pg_collection=pgs,
                                                         wrap_with_ddp=False)
    load_checkpoint(chunks, None, None)
    model = chunks[0].eval()

    def tokenizer():
        from megatron.training import get_tokenizer

        return get_tokenizer()

    prompt, lengths = read_prompts(gen, args, tokenizer)
    micro = gen.inference_micro_batches or args.pipeline_model_parallel_size
    kv_cache = resolve_kv_cache(gen, args, prompt.shape[1], micro)
    sampling = SamplingParams(temperature=gen.temperature, top_k=gen.top_k, top_p=gen.top_p,
                              return_log_probs=gen.return_log_probs)
    options = dict(kv_cache=kv_cache, prompt_lengths=lengths,
                   prefill_chunk=gen.prefill_chunk_size, sampling=sampling, seed=args.seed,
                   eod=tokenizer().eod)
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
    runs, per_step, layer_bytes = [], [], Counter()
    with CommCounter(group_labels()) as counter:
        counter.mark_inside(layers)

        def end_of_step():
            layer_bytes.update(counter.layer_bytes)
            per_step.append(counter.reset())

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
    if args.mxn_log_comm:
        _print_comm(per_step, decode, len(layers), gen.max_new_tokens - 1,
                    bytes_by_layer(layer_bytes))
    decode_steps = max(gen.max_new_tokens - 1, 1)
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
        "comm_per_step_outside_layers": {
            k: v / decode_steps for k, v in sent_bytes_by_group(decode, inside=False).items()},
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
        "comm_bytes_per_decode_step_outside_layers": _max_by_key(
            r["comm_per_step_outside_layers"] for r in everyone),
        "tokens_sha256": last["tokens_sha256"],
        "tokens_head": last["tokens_head"],
        "sampling": describe_sampling(gen, args.seed),
        "texts": last["texts"],
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
    (detokenized by megatron's controller helper), its length, its tokens' log-probs."""
    from megatron.core.inference.text_generation_controllers.text_generation_controller import (
        TextGenerationController,
    )

    if not run.tokens.numel():
        return {"texts": None, "lengths": None, "log_probs": None}
    rows = run.tokens.tolist()
    return {
        "texts": [TextGenerationController.detokenize(tokenizer(), row[:n])
                  for row, n in zip(rows, run.lengths)],
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
    from megatron_mxn.attention.schedules import AUTO, get_kv_cache

    pp = f" PP={args.pipeline_model_parallel_size}" if args.pipeline_model_parallel_size > 1 else ""
    if args.mxn_dim_slices > 1:
        schedule = "" if args.mxn_attention == AUTO else f" {args.mxn_attention}"
        cache = get_kv_cache(kv_cache).label  # (as cost_model.Layout.name)
        return f"grid {args.mxn_head_groups}x{args.mxn_dim_slices}{pp}{schedule}{cache}"
    return f"TP={args.tensor_model_parallel_size}{pp}"


def resolve_kv_cache(gen, args, prompt_length: int, micro: int) -> str:
    """The KV cache of the run (--mxn-kv-cache auto: the cache whose decode step sends fewer
    bytes at the run's mean context length), decided by schedules.decide_kv_cache as
    generation.generate() and the cost model decide it; the same on every rank. Decided here
    once for the whole workload, so that the shorter warm-up generation uses it too."""
    from megatron_mxn.attention.schedules import ScoreShape, decide_kv_cache

    m = args.mxn_dim_slices
    n, h = args.mxn_head_groups, args.num_attention_heads
    g = args.num_query_groups if args.group_query_attention else h
    d = args.kv_channels
    elem = 2 if (args.bf16 or args.fp16) else 4
    shape = ScoreShape(gen.batch_size // micro, h // n, max(g // n, 1), 1, 1, d // m, m, elem)
    return decide_kv_cache(gen.mxn_kv_cache, args.mxn_attention, shape, prompt_length,
                           gen.max_new_tokens).name


def _max_by_key(dicts) -> dict:
    out: dict = {}
    for d in dicts:
        for k, v in d.items():
            out[k] = max(out.get(k, 0.0), v)
    return dict(sorted(out.items()))


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
        ("sent / decode step outside layers", outside),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(["| metric | value |", "|---|---|"]
                     + [f"| {k.ljust(width)} | {v} |" for k, v in rows])


if __name__ == "__main__":
    main()
