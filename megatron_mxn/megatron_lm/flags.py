"""The `--mxn-*` flags: Megatron's `extra_args_provider`, and the replace/alongside-TP rule that
turns them into Megatron's `--tensor-model-parallel-size` before Megatron validates its args;
and the generation entry point's own flags (`GENERATE`, used by megatron_mxn.inference.generate),
defined here so that the run configs (run_configs.py) can tell them from Megatron's."""

from __future__ import annotations

import argparse
import importlib.util
import os
import re

from megatron_mxn.attention.schedules import KV_CACHES, standard_attention
from megatron_mxn.attention.schedules import SCHEDULES as ATTENTION_SCHEDULES
from megatron_mxn.grid.layout import MxnConfigError
from megatron_mxn.megatron_lm.training_log import log_training_comm, record_metrics
from megatron_mxn.patching import patch

TRAINING = "megatron.training from megatron-core 0.19.x"


def add_mxn_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Megatron `extra_args_provider`: adds the grid flags and resolves them into
    `--tensor-model-parallel-size` as part of parsing, so Megatron's validation and
    initialization see the grid's TP size."""
    group = parser.add_argument_group("megatron_mxn", "head-group x dim-slice grid attention")
    group.add_argument("--mxn-head-groups", type=int, default=None, metavar="N",
                       help="n: attention head groups. With --mxn-dim-slices M the TP size "
                            "becomes N*M (the grid replaces TP).")
    group.add_argument("--mxn-dim-slices", type=int, default=None, metavar="M",
                       help="m: slices of every head's dims. Alongside "
                            "--tensor-model-parallel-size T it gives N = T/M head groups.")
    group.add_argument("--mxn-attention", choices=ATTENTION_SCHEDULES, default="auto",
                       help="how the grid computes attention. auto (default): seq for training "
                            "and prefill, the cheaper score schedule for decode; exact: "
                            "partial-score all-reduce over the dim-slice group; gather: "
                            "all-gather of the Q/K slices; seq: the sequence-split core "
                            "(all-to-all to whole heads of s/m tokens, fused kernel, O(s) "
                            "memory). All four compute standard "
                            "attention. sliced: the seed paper's per-slice softmax, a "
                            "DIFFERENT model (h*m heads of d/m dims), never equivalent to "
                            "exact; checkpoints record it and do not mix with exact ones.")
    group.add_argument("--mxn-tp-core", choices=("megatron", "fused"), default="megatron",
                       help="plain TP only (m = 1): the core attention of megatron-core's "
                            "SelfAttention. megatron (default): megatron-core's own; fused: "
                            "the plugin's fused kernels (torch SDPA flash, no s x s scores), "
                            "the kernels the grid's seq core and position-sharded KV cache "
                            "run: TP with like kernels, as a baseline for the grid")
    group.add_argument("--mxn-log-comm", action="store_true",
                       help="count every collective (op, group, bytes, calls) and print a "
                            "per-layer, per-step table (generation) or per-iteration bytes "
                            "per group (training)")
    group.add_argument("--mxn-metrics-file", default=None, metavar="PATH",
                       help="append each iteration's lm loss, grad norm, loss scale and "
                            "learning rate, at full precision, as JSON lines (for A/B "
                            "comparisons; Megatron's log rounds and averages them)")
    group.add_argument("--hf-dir", default=None, metavar="DIR",
                       help="a Hugging Face model directory (config.json, tokenizer): its "
                            "Megatron model flags and HuggingFaceTokenizer come first (explicit "
                            "flags win); --load a checkpoint converted from it (python -m "
                            "megatron_mxn.convert hf-to-megatron) or saved by a run from one")
    _resolve_after_parsing(parser)
    _escape_stray_percent_signs(parser)
    return parser


def _escape_stray_percent_signs(parser: argparse.ArgumentParser) -> None:
    """Make `--help` work: argparse %-formats every help string, and megatron-core 0.19.2's
    help of --moe-paged-stash-buffer-size-factor-cuda contains a bare "10%)", which raises
    ValueError for the whole --help of every Megatron entry point. Doubles a '%' that does not
    start a %(name)s field, in the help strings of the parser this provider is given."""
    for action in parser._actions:
        if action.help and "%" in action.help:
            action.help = re.sub(r"%%|%\(\w+\)[sdr]|%",
                                 lambda mo: "%%" if mo.group(0) == "%" else mo.group(0),
                                 action.help)


def with_mxn_args(provider=None):
    """An `extra_args_provider` adding the grid flags after `provider`'s own (if any)."""

    def both(parser):
        return add_mxn_args(provider(parser) if provider is not None else parser)

    return both


@patch("megatron.training.arguments.parse_args", TRAINING,
       "Megatron validates its args (validate_args) right after parse_args returns, and the "
       "grid flags must have become --tensor-model-parallel-size by then: add_mxn_args (the "
       "extra_args_provider parse_args calls) replaces parse_known_args of the parser it is "
       "given, never argparse's, so that resolve_mxn_args runs inside parse_args",
       fingerprint="7f2b7750e1be", scope="parser")
def _resolve_after_parsing(parser: argparse.ArgumentParser) -> None:
    """argparse's parse_args goes through parse_known_args: resolve the grid flags there (on
    this parser only)."""
    original = parser.parse_known_args

    def parse_known_args(*args, **kwargs):
        namespace, rest = original(*args, **kwargs)
        return resolve_mxn_args(namespace), rest

    parser.parse_known_args = parse_known_args


def resolve_mxn_args(args: argparse.Namespace) -> argparse.Namespace:
    """Apply the replace/alongside rule (identically on every rank, before any collective).

    * `--mxn-head-groups N --mxn-dim-slices M`: TP becomes N*M ("replace TP").
    * `--tensor-model-parallel-size T --mxn-dim-slices M`: N = T/M ("alongside TP").
    * neither: no grid (plain TP, megatron-core's attention).
    A `--tensor-model-parallel-size` of 1 counts as not given. With `--mxn-metrics-file`,
    per-iteration metrics recording starts here too (so every entry point gets it).
    """
    if getattr(args, "mxn_metrics_file", None):
        record_metrics(args.mxn_metrics_file)
    if getattr(args, "mxn_log_comm", False):
        log_training_comm(args.log_interval)
    n, m, tp = args.mxn_head_groups, args.mxn_dim_slices, args.tensor_model_parallel_size
    for flag, value in (("--mxn-head-groups", n), ("--mxn-dim-slices", m)):
        if value is not None and value < 1:
            raise MxnConfigError(f"{flag} must be >= 1, got {value}")
    if n is None and m is None:
        args.mxn_head_groups, args.mxn_dim_slices = tp, 1
        return args
    if m is None:
        m = 1
    if n is None:
        if tp == 1:
            raise MxnConfigError(
                "--mxn-dim-slices needs --mxn-head-groups (grid replaces TP) or "
                "--tensor-model-parallel-size (grid alongside TP)")
        if tp % m:
            raise MxnConfigError(f"--tensor-model-parallel-size ({tp}) must be divisible by "
                                 f"--mxn-dim-slices ({m})")
        n = tp // m
    elif tp not in (1, n * m):
        raise MxnConfigError(
            f"--tensor-model-parallel-size ({tp}) contradicts --mxn-head-groups {n} x "
            f"--mxn-dim-slices {m} = {n * m}; give the grid or the TP size, not both")
    args.mxn_head_groups, args.mxn_dim_slices = n, m
    args.tensor_model_parallel_size = n * m
    if m > 1 and getattr(args, "mxn_tp_core", "megatron") != "megatron":
        raise MxnConfigError(f"--mxn-tp-core {args.mxn_tp_core} is for plain TP (m = 1); the "
                             f"grid (--mxn-dim-slices {m}) runs its own core (--mxn-attention)")
    if m > 1 and getattr(args, "context_parallel_size", 1) > 1:
        raise MxnConfigError("context parallelism cannot be combined with --mxn-dim-slices > 1")
    if not standard_attention(getattr(args, "mxn_attention", "auto")) and m > 1 and \
            os.environ.get("RANK", "0") == "0":
        print(f"> mxn WARNING: --mxn-attention {args.mxn_attention} is not standard attention "
              f"(sliced: the seed paper's per-slice softmax, {args.num_attention_heads} x {m} "
              f"heads of kv_channels/{m} dims); it is not equivalent to TP or the exact grid "
              "and its checkpoints do not load into them", flush=True)
    if m > 1 and getattr(args, "apply_rope_fusion", False):
        # Megatron's default (there is only --no-rope-fusion); TE's fused RoPE kernel on the
        # grid's sliced rotary dims is untested (options.py refuses it), unfused RoPE is exact.
        args.apply_rope_fusion = False
        if os.environ.get("RANK", "0") == "0":
            print("> mxn: RoPE runs unfused on the grid (apply_rope_fusion=False, as "
                  "--no-rope-fusion)", flush=True)
    if getattr(args, "transformer_impl", None) == "transformer_engine" and not _have_te():
        args.transformer_impl = "local"  # FP16/BF16 linears from megatron-core instead
    return args


def _have_te() -> bool:
    return importlib.util.find_spec("transformer_engine") is not None


# The flags of the generation entry point (megatron_mxn.inference.generate) beside Megatron's.
GENERATE = argparse.ArgumentParser(add_help=False)
_g = GENERATE.add_argument_group("generation (megatron_mxn)")
_g.add_argument("--batch-size", type=int, default=8, help="prompts generated together")
_g.add_argument("--prompt-length", type=int, default=32,
                help="length of random prompts (token ids) when there is no --prompts-file")
_g.add_argument("--prompts-file", default=None,
                help="one prompt per line: token ids separated by spaces, or text (tokenized "
                     "with Megatron's tokenizer flags), repeated to fill the batch; prompts of "
                     "different lengths prefill the shortest, then feed each its own tokens "
                     "(megatron's static engine)")
_g.add_argument("--max-new-tokens", type=int, default=16, help="tokens generated per prompt")
_g.add_argument("--inference-micro-batches", type=int, default=None,
                help="micro-batches flowing through the pipeline (default: PP size)")
_g.add_argument("--warmup-steps", type=int, default=2,
                help="tokens of one untimed warm-up generation (0: none)")
_g.add_argument("--repeats", type=int, default=1, help="timed generations")
_g.add_argument("--output-json", default=None, help="write the report here (rank 0)")
_g.add_argument("--progress-interval", type=int, default=32,
                help="print progress every this many decode steps")
_g.add_argument("--prompt-seed", type=int, default=1234, help="seed of the random prompts")
_g.add_argument("--mxn-kv-cache", choices=KV_CACHES, default="auto",
                help="the grid's KV cache: dims (each rank keeps d/m dims of every position; "
                     "a decode step all-reduces scores over the context), positions (each "
                     "rank keeps all dims of every m-th position; a decode step sends "
                     "O(b*h*d), independent of the context), auto (default: the one whose "
                     "decode step sends fewer bytes at the run's mean context length)")
_g.add_argument("--prefill-chunk-size", type=int, default=None,
                help="prefill the prompt in chunks of this many tokens (default: at once)")
# Sampling: the flags of Megatron-LM's inference examples, with their defaults (greedy); the
# seed is Megatron's --seed, the same on every rank.
_g.add_argument("--temperature", type=float, default=1.0,
                help="sampling temperature (0: greedy)")
_g.add_argument("--top_k", type=int, default=1,
                help="sample from the k most likely tokens (1, the default: greedy; 0: off)")
_g.add_argument("--top_p", type=float, default=0.0,
                help="sample from the most likely tokens holding probability p (needs --top_k 0)")
_g.add_argument("--return-log-probs", action="store_true",
                help="report the log-probability of every generated token")
