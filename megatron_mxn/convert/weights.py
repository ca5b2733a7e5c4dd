"""Tensor-by-tensor mapping between a Hugging Face state dict (the names of its safetensors
files) and megatron-core's TP=1 GPTModel state dict (local layer spec: separate input /
pre-MLP norms; megatron maps them to its checkpoint keys itself).

Only reshapes and concatenations: no arithmetic touches a value, so HF -> Megatron -> HF is
bit-identical. The one real layout change is megatron's fused QKV: rows ordered by KV group,
each group [its h/g query heads, its key head, its value head] (megatron-core's
SelfAttention.get_query_key_value_tensors splits it that way). RoPE needs no permutation:
transformers' rotate_half and megatron's non-interleaved RoPE both pair dim k with k + d/2.
"""

from __future__ import annotations

from typing import Dict, List, Tuple

import torch

from megatron_mxn.convert.hf_config import ConversionError, head_dim

State = Dict[str, torch.Tensor]
Rule = Tuple[Tuple[str, ...], str, str]  # (HF names, megatron name, kind)


def _shape(cfg: dict) -> Tuple[int, int, int]:
    h = cfg["num_attention_heads"]
    return h, cfg.get("num_key_value_heads") or h, head_dim(cfg)


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: dict) -> torch.Tensor:
    """q [h*d, ...], k, v [g*d, ...] -> megatron's linear_qkv [(h + 2g)*d, ...]."""
    h, g, d = _shape(cfg)
    rest = q.shape[1:]
    parts = (q.reshape(g, h // g * d, *rest), k.reshape(g, d, *rest), v.reshape(g, d, *rest))
    return torch.cat(parts, dim=1).reshape((h + 2 * g) * d, *rest)


def split_qkv(qkv: torch.Tensor, cfg: dict) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    h, g, d = _shape(cfg)
    rest = qkv.shape[1:]
    q, k, v = qkv.reshape(g, (h // g + 2) * d, *rest).split([h // g * d, d, d], dim=1)
    return (q.reshape(h * d, *rest).clone(), k.reshape(g * d, *rest).clone(),
            v.reshape(g * d, *rest).clone())


def _layer_rules(cfg: dict, i: int) -> List[Rule]:
    hf, mg = f"model.layers.{i}.", f"decoder.layers.{i}."
    att, qkv = hf + "self_attn.", mg + "self_attention.linear_qkv."
    rules = [((hf + "input_layernorm.weight",), mg + "input_layernorm.weight", "same"),
             (tuple(f"{att}{p}_proj.weight" for p in "qkv"), qkv + "weight", "qkv"),
             ((att + "o_proj.weight",), mg + "self_attention.linear_proj.weight", "same"),
             ((hf + "post_attention_layernorm.weight",), mg + "pre_mlp_layernorm.weight", "same")]
    if cfg["model_type"] == "qwen2":  # q/k/v biases, no o_proj bias
        rules.append((tuple(f"{att}{p}_proj.bias" for p in "qkv"), qkv + "bias", "qkv"))
    if cfg["model_type"] == "qwen3":
        rules += [((att + "q_norm.weight",), mg + "self_attention.q_layernorm.weight", "same"),
                  ((att + "k_norm.weight",), mg + "self_attention.k_layernorm.weight", "same")]
    if cfg["model_type"] != "mixtral":  # fc1 is [gate; up] for --swiglu
        return rules + [
            ((hf + "mlp.gate_proj.weight", hf + "mlp.up_proj.weight"), mg + "mlp.linear_fc1.weight",
             "cat"),
            ((hf + "mlp.down_proj.weight",), mg + "mlp.linear_fc2.weight", "same")]
    moe, experts = hf + "block_sparse_moe.", mg + "mlp.experts.local_experts."
    rules.append(((moe + "gate.weight",), mg + "mlp.router.weight", "same"))
    for e in range(cfg["num_local_experts"]):  # w1 gate, w3 up, w2 down
        rules += [((f"{moe}experts.{e}.w1.weight", f"{moe}experts.{e}.w3.weight"),
                   f"{experts}{e}.linear_fc1.weight", "cat"),
                  ((f"{moe}experts.{e}.w2.weight",), f"{experts}{e}.linear_fc2.weight", "same")]
    return rules


def rules(cfg: dict) -> List[Rule]:
    """(HF names, megatron name, how they relate) for every tensor of the model: 'same' (one
    tensor), 'cat' (megatron's is the HF ones stacked on dim 0), 'qkv' (fused QKV)."""
    out: List[Rule] = [(("model.embed_tokens.weight",), "embedding.word_embeddings.weight", "same"),
                       (("model.norm.weight",), "decoder.final_layernorm.weight", "same")]
    if not cfg.get("tie_word_embeddings", False):
        out.append((("lm_head.weight",), "output_layer.weight", "same"))
    for i in range(cfg["num_hidden_layers"]):
        out += _layer_rules(cfg, i)
    return out


JOIN = {"same": lambda ts, cfg: ts[0], "cat": lambda ts, cfg: torch.cat(ts, dim=0),
        "qkv": lambda ts, cfg: fuse_qkv(*ts, cfg)}
SPLIT = {"same": lambda t, cfg: (t,), "cat": lambda t, cfg: tuple(c.clone() for c in t.chunk(2)),
         "qkv": split_qkv}


def _take(state: State, name: str) -> torch.Tensor:
    if name not in state:
        raise ConversionError(f"tensor {name} is missing from the checkpoint")
    return state.pop(name)


def _check_used(src: State, what: str) -> None:
    if src:
        raise ConversionError(f"{what} tensors the mapping does not know (config and weights "
                              f"disagree?): {sorted(src)[:8]}")


def hf_to_megatron(hf_state: State, cfg: dict) -> State:
    """megatron-core TP=1 state dict from an HF state dict of the family `cfg` describes.
    Every HF tensor must be used (a tied `lm_head.weight` may be present if it equals the
    embedding)."""
    src = dict(hf_state)
    if cfg.get("tie_word_embeddings", False) and "lm_head.weight" in src:
        if not torch.equal(src.pop("lm_head.weight"), src["model.embed_tokens.weight"]):
            raise ConversionError("tie_word_embeddings is true but lm_head.weight differs "
                                  "from model.embed_tokens.weight")
    out = {mg: JOIN[kind]([_take(src, n) for n in names], cfg) for names, mg, kind in rules(cfg)}
    _check_used(src, "HF")
    return out


def megatron_to_hf(mg_state: State, cfg: dict) -> State:
    """HF state dict (safetensors names) from megatron-core's TP=1 state dict; the inverse of
    hf_to_megatron. Megatron's `_extra_state` entries (None in the local spec) are dropped."""
    src = {k: v for k, v in mg_state.items() if not k.endswith("._extra_state")}
    out: State = {}
    for names, mg, kind in rules(cfg):
        out.update(zip(names, SPLIT[kind](_take(src, mg), cfg)))
    _check_used(src, "Megatron")
    return out
