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

This module builds and loads the model; the flags and request checks are generate_flags', the
timed generations and the report benchmark's.
"""

from __future__ import annotations

import json
import sys

from megatron_mxn.grid.layout import MxnConfigError
from megatron_mxn.inference.benchmark import benchmark, format_report
from megatron_mxn.inference.generate_flags import check_request, split_argv
from megatron_mxn.megatron_lm import with_mxn_args
from megatron_mxn.megatron_lm.entry import install
from megatron_mxn.megatron_lm.grid_groups import initialize_grid_after_megatron
from megatron_mxn.megatron_lm.model_config import mxn_gpt_config_from_args

# Imported before CPU mode is enabled (main enables it): the modules that import megatron are
# imported inside the functions that run after it.


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


def refuse_before_collectives(args) -> None:
    """What the model config refuses (the grid's options, MLA's among them), on every rank
    before Megatron's initialization (its first collective): the config is built again after
    it, with the tokenizer's padded vocabulary. (Hybrid models: their config's own checks.)"""
    from megatron.training.utils import is_hybrid_model

    from megatron_mxn.megatron_lm.model_config import (
        check_grid_options,
        mxn_transformer_config_from_args,
    )

    if not is_hybrid_model(args):
        check_grid_options(args, mxn_transformer_config_from_args(args))


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
    from megatron.core.inference.sampling_params import SamplingParams
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.training.checkpointing import load_checkpoint
    from megatron.training.initialize import initialize_megatron

    from megatron_mxn.grid.groups import mxn_parallel_is_initialized  # (megatron)

    refuse_before_collectives(args)
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
    if args.mxn_tp_core == "fused":
        from megatron_mxn.attention.fused_core import check_fused_model

        check_fused_model(model)

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
    return benchmark(gen, args, cpu, model, pgs, prompt, micro, options, tokenizer)


def resolve_kv_cache(gen, args, prompt_length: int, micro: int) -> str:
    """The KV cache of the run (--mxn-kv-cache auto: the cache whose decode step sends fewer
    bytes at the run's mean context length), decided by schedules.decide_kv_cache as
    generation.generate() and the cost model decide it; the same on every rank. Decided here
    once for the whole workload, so that the shorter warm-up generation uses it too."""
    from megatron_mxn.attention.mla_decode import LATENT_POSITIONS, check_kv_cache_request
    from megatron_mxn.attention.schedules import ScoreShape, decide_kv_cache

    if getattr(args, "multi_latent_attention", False) and args.mxn_dim_slices > 1:
        check_kv_cache_request(gen.mxn_kv_cache)  # the grid's MLA has one cache: the latent
        return LATENT_POSITIONS.name
    m = args.mxn_dim_slices
    n, h = args.mxn_head_groups, args.num_attention_heads
    g = args.num_query_groups if args.group_query_attention else h
    d = args.kv_channels
    elem = 2 if (args.bf16 or args.fp16) else 4
    shape = ScoreShape(gen.batch_size // micro, h // n, max(g // n, 1), 1, 1, d // m, m, elem)
    return decide_kv_cache(gen.mxn_kv_cache, args.mxn_attention, shape, prompt_length,
                           gen.max_new_tokens).name


if __name__ == "__main__":
    main()
