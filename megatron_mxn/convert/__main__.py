"""python -m megatron_mxn.convert {hf-to-megatron,megatron-to-hf,tokenize}: see docs/hf.md.

Runs on CPU in one process (a gloo world of one rank, megatron_mxn's CPU mode), so that the
model is megatron-core's local-spec GPTModel at TP=1 whatever machine runs it.
"""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m megatron_mxn.convert", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    to_mg = sub.add_parser("hf-to-megatron", help="HF directory -> Megatron checkpoint")
    to_mg.add_argument("--hf-dir", required=True, help="config.json + safetensors (+ tokenizer)")
    to_mg.add_argument("--save", required=True, help="Megatron checkpoint directory to write")
    to_hf = sub.add_parser("megatron-to-hf", help="Megatron checkpoint -> HF directory")
    to_hf.add_argument("--load", required=True, help="Megatron torch_dist checkpoint directory")
    to_hf.add_argument("--hf-dir", required=True,
                       help="the HF directory whose config, tokenizer and file layout to use")
    to_hf.add_argument("--save-hf", required=True, help="HF directory to write")
    tok = sub.add_parser("tokenize", help="text -> Megatron indexed dataset, with the HF "
                                          "directory's tokenizer (for fine-tuning)")
    tok.add_argument("--hf-dir", required=True, help="the HF directory whose tokenizer to use")
    tok.add_argument("--input", required=True,
                     help="loose JSON (.json/.jsonl: one object per line) or text (one "
                          "document per non-empty line)")
    tok.add_argument("--output-prefix", required=True,
                     help="writes PREFIX_<key>_document.bin/.idx (give that to --data-path)")
    tok.add_argument("--json-keys", default="text", metavar="KEY",
                     help="the JSON key holding a document's text (default: text)")
    return parser


def run(opts) -> int:
    """Run one parsed command in a world of one rank at TP=1; print what it wrote and the
    model's Megatron flags (or the refusal, exit status 2)."""
    from megatron_mxn.convert import convert
    from megatron_mxn.convert.hf_config import ConversionError

    try:
        if opts.command == "tokenize":
            from megatron_mxn.convert.dataset import tokenize_corpus

            wrote = tokenize_corpus(opts.hf_dir, opts.input, opts.output_prefix, opts.json_keys)
            print(f"wrote {wrote['documents']} documents, {wrote['tokens']} tokens (end-of-"
                  f"document ids included): --data-path {wrote['data_path']}", flush=True)
            return 0
        if opts.command == "hf-to-megatron":
            flags = convert.hf_to_megatron(opts.hf_dir, opts.save)
            done = f"wrote Megatron checkpoint {opts.save} (release)"
        else:
            flags = convert.megatron_to_hf(opts.load, opts.hf_dir, opts.save_hf)
            done = f"wrote HF model {opts.save_hf}"
    except ConversionError as e:
        print(f"megatron_mxn.convert: {e}", file=sys.stderr, flush=True)
        return 2
    print(done, flush=True)
    print("Megatron model flags: " + " ".join(flags), flush=True)
    return 0


def main(argv=None) -> int:
    opts = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    from megatron_mxn.cpu.launch import bootstrap_rank, free_port

    bootstrap_rank(0, 1, free_port(), training=True)
    from megatron_mxn.grid.groups import clean_shutdown

    with clean_shutdown():
        from megatron.core import parallel_state
        from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

        parallel_state.initialize_model_parallel(1, 1)
        model_parallel_cuda_manual_seed(0)
        try:
            return run(opts)
        finally:
            parallel_state.destroy_model_parallel()


if __name__ == "__main__":
    sys.exit(main())
