"""Tiny Hugging Face models of every converted family (random weights, a byte-level BPE
tokenizer trained on tests/data/tiny_corpus.txt), written locally: no downloads. And the worker
side of tests/test_hf_convert.py: conversions, megatron's logits on TP=1 and on the grid, and
transformers' logits for the same tokens.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Dict, List, Optional

import torch

CORPUS = Path(__file__).resolve().parent.parent / "data" / "tiny_corpus.txt"
VOCAB = 384  # 256 bytes + an end-of-text token + merges; divisible by every TP size tested
EOS = "<|endoftext|>"
SEQ = 16

# Shared by every family: 2 layers, hidden 64, 8 query heads, 2 KV heads, head_dim 16 (so the
# attention width 128 differs from hidden: megatron's --kv-channels), grids 2x2 and 1x4 fit.
BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=8, num_key_value_heads=2, head_dim=16,
            max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=False)

FAMILIES: Dict[str, dict] = {
    # Llama-3.1 RoPE scaling: with head_dim 16 the wavelengths span all three bands of the
    # 8192-token original context (kept, interpolated, divided by 8).
    "llama": dict(max_position_embeddings=16384,  # above the original 8192 (transformers warns)
                  rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0,
                                   "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 8192}),
    "qwen2": dict(tie_word_embeddings=True,  # as Qwen2.5's small models; QKV bias
                  rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
    "qwen3": dict(rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
    "mistral": dict(sliding_window=5,  # shorter than the sequence: the window matters
                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2,
                    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
}


def train_tokenizer(out_dir: str):
    """A byte-level BPE of VOCAB ids saved as tokenizer.json + tokenizer_config.json (what
    AutoTokenizer, and so Megatron's HuggingFaceTokenizer, loads); returns it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train([str(CORPUS)], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS,
                                   model_max_length=BASE["max_position_embeddings"])
    fast.save_pretrained(out_dir)
    return fast


def hf_config(family: str):
    from transformers import AutoConfig

    return AutoConfig.for_model(family, **{**BASE, **FAMILIES[family]})


@torch.no_grad()
def randomize(model, seed: int) -> None:
    """Every tensor random (norm weights around 1, the rest N(0, 0.05)): a mapping that swaps
    or misorders any two tensors changes the logits."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
        p.copy_(1 + 0.2 * noise if "norm" in name else 0.05 * noise)


def make_hf_model(family: str, out_dir: str, seed: int = 0,
                  dtype: torch.dtype = torch.float32) -> dict:
    """Write a tiny `family` model (random weights, float32 unless `dtype`) with its tokenizer
    to out_dir, as save_pretrained does; returns its config as a dict."""
    from transformers import AutoModelForCausalLM

    os.makedirs(out_dir, exist_ok=True)
    tok = train_tokenizer(out_dir)
    config = hf_config(family)
    config.bos_token_id = config.eos_token_id = tok.convert_tokens_to_ids(EOS)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    randomize(model, seed)
    model = model.to(dtype)
    model.save_pretrained(out_dir)
    return config.to_dict()


def tokens(batch: int = 2, seed: int = 5) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, SEQ), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def hf_logits(hf_dir: str, ids: torch.Tensor, dtype: torch.dtype = torch.float32
              ) -> torch.Tensor:
    """transformers' logits (eager attention), computed in `dtype` (weights cast to it)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype,
                                                 attn_implementation="eager").eval()
    return model(ids).logits.float()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|."""
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max()).item()


# ------------------------------------------------------------------ worker side (pool ranks)

def _tp1():
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    import megatron_mxn.cpu

    megatron_mxn.cpu.enable(training=True)
    parallel_state.initialize_model_parallel(1, 1)
    model_parallel_cuda_manual_seed(0)


def back_and_logits(hf_dir: str, ckpt: str, out_dir: str, expected: torch.Tensor,
                    prompts: Optional[List[List[int]]] = None, eos: Optional[int] = None
                    ) -> dict:
    """On a world of one rank: the converted checkpoint back to HF (every tensor compared with
    hf_dir's), and megatron-core's TP=1 model from the checkpoint: its logits against
    transformers' (`expected`, hf_logits of tokens()) and, with `prompts`, its greedy tokens
    (each sequence cut before `eos`)."""
    from safetensors.torch import load_file

    from megatron_mxn.convert import checkpoint, convert, hf_files

    _tp1()
    convert.megatron_to_hf(ckpt, hf_dir, out_dir)
    before = load_file(os.path.join(hf_dir, "model.safetensors"))
    after = load_file(os.path.join(out_dir, "model.safetensors"))
    different = sorted(k for k in before if k not in after or before[k].dtype != after[k].dtype
                       or not torch.equal(before[k], after[k]))
    args = convert.hf_args(hf_files.read_config(hf_dir), [])
    model = checkpoint.build_model(args)
    convert.load_weights(model, checkpoint.load_tp1_state(ckpt, args))
    ids = tokens()
    with torch.no_grad():
        got = model.eval()(ids, torch.arange(SEQ).expand_as(ids), None)
    greedy = None
    if prompts:
        from megatron.core.process_groups_config import ProcessGroupCollection

        greedy = _greedy(model, ProcessGroupCollection.use_mpu_process_groups(), prompts, eos)
    return {"different": different, "same_keys": sorted(before) == sorted(after),
            "side_files": sorted(os.listdir(out_dir)),
            "logits_err": rel_err(got, expected), "tokens": greedy}


def tokenizer_and_mismatch(hf_dir: str, other_dir: str, ckpt: str) -> dict:
    """Megatron's HuggingFaceTokenizer on the HF directory gives transformers' ids; converting
    `ckpt` back with another family's config is refused."""
    from megatron.core.tokenizers.utils.build_tokenizer import build_tokenizer
    from transformers import AutoTokenizer

    from megatron_mxn.convert import convert, hf_run
    from megatron_mxn.convert.hf_config import ConversionError

    _tp1()
    args = convert.hf_args(hf_files_config(hf_dir), hf_run.tokenizer_flags(hf_dir))
    tok = build_tokenizer(args)
    text = CORPUS.read_text()[:400]
    same = tok.tokenize(text) == AutoTokenizer.from_pretrained(hf_dir)(text)["input_ids"]
    try:
        convert.megatron_to_hf(ckpt, other_dir, os.path.join(os.path.dirname(ckpt), "refused"))
        mismatch = ""
    except ConversionError as e:
        mismatch = str(e)
    return {"same_ids": same, "vocab": tok.vocab_size, "mismatch": mismatch}


def hf_files_config(hf_dir: str) -> dict:
    from megatron_mxn.convert import hf_files

    return hf_files.read_config(hf_dir)


def command_line(argv: List[str], cwd: Optional[str] = None) -> dict:
    """megatron_mxn.convert's command `argv` (parsed and run as __main__ does, in this world
    of one rank, in directory `cwd`): its exit status and output."""
    import io

    from megatron_mxn.convert.__main__ import build_parser, run

    _tp1()
    out, err = io.StringIO(), io.StringIO()
    here = os.getcwd()
    try:
        os.chdir(cwd or here)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            status = run(build_parser().parse_args(argv))
    finally:
        os.chdir(here)
    return {"status": status, "stdout": out.getvalue(), "stderr": err.getvalue()}


def convert_only(hf_dir: str, ckpt: str) -> List[str]:
    from megatron_mxn.convert import convert

    _tp1()
    return convert.hf_to_megatron(hf_dir, ckpt)


@contextlib.contextmanager
def microbatches(args):
    """Megatron's micro-batch calculator, which load_checkpoint updates (initialize_megatron
    would have set it up)."""
    from megatron.core import num_microbatches_calculator as calc

    calc.init_num_microbatches_calculator(0, None, args.global_batch_size, args.micro_batch_size,
                                          args.data_parallel_size)
    try:
        yield
    finally:
        calc.destroy_num_microbatches_calculator()


# Three lengths (right padding); on the tiny Llama the third prompt's first greedy token is the
# end-of-sequence token (an empty output), the other two run all NEW_TOKENS steps.
PROMPTS = ("The quick brown fox jumps over", "A tiny model", "The grid splits every head")
NEW_TOKENS = 8


def prompt_ids(hf_dir: str) -> List[List[int]]:
    """PROMPTS as the HF directory's tokenizer (transformers) encodes them."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf_dir)
    return [tok(text)["input_ids"] for text in PROMPTS]


@torch.no_grad()
def hf_greedy(hf_dir: str, prompts: List[List[int]], new_tokens: int = NEW_TOKENS
              ) -> List[List[int]]:
    """transformers' greedy `generate`, one prompt at a time, each output cut before its
    first end-of-sequence token (where megatron's generation ends a sequence)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    eos = model.config.eos_token_id
    out = []
    for ids in prompts:
        row = model.generate(torch.tensor([ids]), max_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=eos)[0, len(ids):].tolist()
        out.append(row[:row.index(eos)] if eos in row else row)
    return out


def _greedy(model, pgs, prompts: List[List[int]], eos: Optional[int], kv_cache=None
            ) -> List[List[int]]:
    """megatron_mxn's greedy generate() of NEW_TOKENS for the prompts (right-padded in one
    batch), each sequence cut before `eos` (the last stage's tokens)."""
    from megatron_mxn.inference.generation import generate

    lengths = [len(p) for p in prompts]
    batch = torch.tensor([p + [0] * (max(lengths) - len(p)) for p in prompts])
    run = generate(model, batch, NEW_TOKENS, pgs, kv_cache=kv_cache, prompt_lengths=lengths,
                   eod=eos)
    return [row[:k] for row, k in zip(run.tokens.tolist(), run.lengths)]


def _grid_model(hf_dir: str, ckpt: str, n: int, m: int, extra: List[str]):
    """(model, process groups, args): the grid (TP when m = 1) model built from the converted
    flags the way the entry points build it, loaded with megatron.training's load_checkpoint."""
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from megatron.training.checkpointing import load_checkpoint

    import megatron_mxn
    import megatron_mxn.cpu
    from megatron_mxn.convert import convert, hf_files
    from megatron_mxn.convert.megatron_model import build_model, global_args
    from megatron_mxn.megatron_lm.flags import add_mxn_args
    from megatron_mxn.megatron_lm.model_config import mxn_gpt_config_from_args

    megatron_mxn.cpu.enable(training=True)
    cfg = hf_files.read_config(hf_dir)
    args = convert.hf_args(cfg, ["--tensor-model-parallel-size", str(n * m),
                                 "--mxn-dim-slices", str(m), "--load", ckpt, *extra],
                           extra_args_provider=add_mxn_args)
    pgs = megatron_mxn.initialize_mxn_parallel(n, m, create_gloo_process_groups=False)
    model_parallel_cuda_manual_seed(0)
    model = build_model(args, mxn_gpt_config_from_args)
    with global_args(args), microbatches(args):
        load_checkpoint([model], None, None)
    return model.eval(), pgs, args


def grid_logits_vs_hf(hf_dir: str, ckpt: str, n: int, m: int, expected: torch.Tensor,
                      save: str = "", prompts: Optional[List[List[int]]] = None,
                      eos: Optional[int] = None) -> dict:
    """On n*m ranks: the grid model loaded from `--load ckpt`: its logits vs transformers'
    (`expected`) and, with `prompts`, its greedy tokens with each KV cache (dims, positions;
    each sequence cut before `eos`). With `save`, the grid then saves it there (iteration 1)
    with megatron.training's save_checkpoint, as a training run would."""
    from megatron.core import tensor_parallel
    from megatron.training.checkpointing import save_checkpoint

    from megatron_mxn.convert.megatron_model import global_args

    saving = ["--save", save, "--save-interval", "1"] if save else []
    model, pgs, args = _grid_model(hf_dir, ckpt, n, m, saving)
    ids = tokens()
    with torch.no_grad():
        local = model(ids, torch.arange(SEQ).expand_as(ids), None)
        full = tensor_parallel.gather_from_tensor_model_parallel_region(local, group=pgs.tp)
    result = {"logits_err": rel_err(full, expected), "tokens": {}}
    if prompts:
        for cache in (("dims", "positions") if m > 1 else ("dims",)):
            result["tokens"][cache] = _greedy(model, pgs, prompts, eos, kv_cache=cache)
    if save:
        with global_args(args), microbatches(args):
            save_checkpoint(1, [model], None, None, 0)
    return result
