"""Text to a Megatron indexed dataset with an HF directory's tokenizer, for fine-tuning the
converted model (`python -m megatron_mxn.convert tokenize`): what Megatron-LM's
tools/preprocess_data.py does with --append-eod, for users of the megatron-core wheel, which
does not ship that tool.

The tokenizer is Megatron's HuggingFaceTokenizer built from the same flags `--hf-dir` gives a
training run, so the dataset's ids and end-of-document token are the ones training reads.
"""

from __future__ import annotations

import json
import os
from typing import Iterator

from megatron_mxn.convert.hf_config import ConversionError


def documents(path: str, json_key: str) -> Iterator[str]:
    """The documents of `path`: one JSON object per line (Megatron's loose JSON, the text under
    `json_key`) for .json/.jsonl files, else one document per non-empty line."""
    loose_json = path.endswith((".json", ".jsonl"))
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            if not loose_json:
                yield line.rstrip("\n")
                continue
            record = json.loads(line)
            if json_key not in record:
                raise ConversionError(f"{path}:{number}: no '{json_key}' key (--json-keys)")
            yield record[json_key]


def tokenize_corpus(hf_dir: str, input_path: str, output_prefix: str,
                    json_key: str = "text") -> dict:
    """Write `<output_prefix>_<json_key>_document.{bin,idx}` (Megatron's naming) with every
    document's ids followed by the end-of-document id; returns the --data-path and counts."""
    import numpy as np
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder
    from megatron.core.tokenizers.utils.build_tokenizer import build_tokenizer

    from megatron_mxn.convert.convert import hf_args
    from megatron_mxn.convert.hf_files import read_config
    from megatron_mxn.convert.hf_run import tokenizer_flags

    flags = tokenizer_flags(hf_dir)
    if not flags:
        raise ConversionError(f"{hf_dir} holds no tokenizer (tokenizer.json, "
                              "tokenizer_config.json or tokenizer.model)")
    cfg = read_config(hf_dir)
    tokenizer = build_tokenizer(hf_args(cfg, flags))
    if tokenizer.eod is None:
        raise ConversionError(f"the tokenizer of {hf_dir} has no end-of-sequence token, which "
                              "Megatron's datasets use to end a document")
    prefix = f"{output_prefix}_{json_key}_document"
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=DType.optimal_dtype(cfg["vocab_size"]))
    docs = tokens = 0
    for text in documents(input_path, json_key):
        ids = [*tokenizer.tokenize(text), tokenizer.eod]
        builder.add_document(np.array(ids), [len(ids)])
        docs, tokens = docs + 1, tokens + len(ids)
    if not docs:
        raise ConversionError(f"{input_path} holds no document")
    builder.finalize(f"{prefix}.idx")
    return {"data_path": prefix, "documents": docs, "tokens": tokens}
