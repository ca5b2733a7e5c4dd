"""megatron-core's own inference engine (StaticInferenceEngine, legacy=True) over a
TextGenerationController and a GPTInferenceWrapper, driving a grid model and TP=1 on the
same weights; and the refusal of the dynamic engine for grid models."""

from __future__ import annotations

import warnings

from megatron.core.inference.contexts import StaticInferenceContext
from megatron.core.inference.engines import StaticInferenceEngine
from megatron.core.inference.engines.dynamic_engine import DynamicInferenceEngine
from megatron.core.inference.inference_request import InferenceRequest
from megatron.core.inference.model_inference_wrappers.gpt.gpt_inference_wrapper import (
    GPTInferenceWrapper,
)
from megatron.core.inference.sampling_params import SamplingParams
from megatron.core.inference.text_generation_controllers.text_generation_controller import (
    TextGenerationController,
)
from megatron.core.tokenizers import MegatronTokenizer

from tests.cases.common import VOCAB, ModelSpec, load, save
from tests.cases.common import grid_model, teardown

PROMPTS = ["3 14 15 92 65 35", "89 79 32"]  # different lengths: the engine's mixed batches
NEW_TOKENS = 8
SAMPLING = {  # name: SamplingParams keywords (megatron's; top_k 1 is greedy)
    "greedy": dict(top_k=1),
    "top_k": dict(temperature=0.8, top_k=5),
    "top_p": dict(temperature=1.3, top_p=0.9),
}


def tokenizer(eod: int = VOCAB - 1):
    """Megatron's NullTokenizer (text of token ids), with `eod` ending a generation."""
    return MegatronTokenizer.from_pretrained(metadata_path={"library": "null-text"},
                                             vocab_size=VOCAB, eod_id=eod)


def static_engine(model, tok, legacy: bool = True) -> StaticInferenceEngine:
    """megatron's engine, controller and GPT wrapper over a static KV cache."""
    context = StaticInferenceContext(max_batch_size=len(PROMPTS), max_sequence_length=32)
    controller = TextGenerationController(GPTInferenceWrapper(model, context), tok)
    with warnings.catch_warnings():  # (0.19 announces the static engine's deprecation)
        warnings.simplefilter("ignore")
        return StaticInferenceEngine(controller, max_batch_size=len(PROMPTS), legacy=legacy)


def run_engine(engine, tok, **sampling) -> dict:
    """The engine's generations of PROMPTS: tokens, text and log-probs of each request.
    (Requests carry their tokens: megatron's NullTokenizer has no BOS for tokenize_prompt.)"""
    params = SamplingParams(num_tokens_to_generate=NEW_TOKENS, return_log_probs=True, **sampling)
    requests = [InferenceRequest(request_id=engine.get_new_request_id(), prompt=p,
                                 prompt_tokens=tok.tokenize(p), sampling_params=params)
                for p in PROMPTS]
    done = engine.generate(inference_requests=requests)
    return {"tokens": [r.generated_tokens.tolist() for r in done],
            "text": [r.generated_text for r in done],
            "log_probs": [list(r.prompt_log_probs) + list(r.generated_log_probs) for r in done]}


def generations(model) -> dict:
    """Each SAMPLING mode through one engine (its sampling generator seeded once, from the
    config's inference_sampling_seed, as megatron does), then greedy with an end-of-document
    id that the greedy run generates: sequences stop there."""
    tok = tokenizer()
    engine = static_engine(model, tok)
    out = {name: run_engine(engine, tok, **params) for name, params in SAMPLING.items()}
    eod = out["greedy"]["tokens"][0][3]
    stopping = tokenizer(eod)
    out["eod"] = {"id": eod, **run_engine(static_engine(model, stopping), stopping, top_k=1)}
    return out


def engine_matches_tp1(ckpt_dir: str) -> dict:
    """megatron's engine on TP=1 and on the grid 2x2, same weights."""
    spec = ModelSpec()
    ref, _ = grid_model(spec, 1, 1, grid=False)
    save(ref, ckpt_dir)
    want = generations(ref.eval())
    teardown()
    model, _ = grid_model(spec, 2, 2, grid=True, seed=99)
    load(model, ckpt_dir)
    got = generations(model.eval())
    teardown()
    return {"tp1": want, "grid": got}


def dynamic_engine_is_refused() -> dict:
    """Building StaticInferenceEngine without legacy=True, or a DynamicInferenceEngine, for a
    grid model fails at construction with the rule named, on every rank."""
    model, _ = grid_model(ModelSpec(), 2, 2, grid=True)
    messages = {}
    for name, build in (
        ("static", lambda: static_engine(model, tokenizer(), legacy=False)),
        ("dynamic", lambda: DynamicInferenceEngine(
            static_engine(model, tokenizer()).controller,
            StaticInferenceContext(len(PROMPTS), 32))),
    ):
        try:
            build()
            messages[name] = None
        except Exception as err:  # noqa: BLE001  (the message is the result)
            messages[name] = f"{type(err).__name__}: {err}"
    teardown()
    # megatron's stock attention (TP=4) is not refused: the engine goes on to megatron's own
    # dynamic-engine attempt (which on 2 requests over TP=4 fails and falls back, warning)
    model, _ = grid_model(ModelSpec(), 4, 1, grid=False)
    controller = static_engine(model, tokenizer()).controller
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        StaticInferenceEngine(controller, max_batch_size=len(PROMPTS), buffer_size_gb=0.01)
    messages["non_grid"] = [str(w.message) for w in caught]
    teardown()
    return messages
