"""Model building and measuring helpers shared by the distributed test cases.

Everything here runs inside a worker rank (tests/pool.py) with CPU mode enabled.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Callable, Dict, Optional

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import (
    ShardedObject,
    ShardedTensor,
    ShardedTensorFactory,
)
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.models.gpt.gpt_model import GPTModel
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

import megatron_mxn
from megatron_mxn import MxnTransformerConfig
from megatron_mxn.attention.self_attention import model_rotary_percent

VOCAB = 128
SEQ = 16
BATCH = 2
SEED = 1234

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclasses.dataclass
class ModelSpec:
    """Everything that defines a test model, independent of its parallel layout."""

    num_layers: int = 2
    hidden: int = 64
    heads: int = 8
    kv_heads: int = 2
    head_dim: int = 16
    position: str = "rope"  # rope | learned_absolute | none
    rotary_percent: float = 1.0
    interleaved: bool = False
    qk_norm: Optional[str] = None  # None | LayerNorm | RMSNorm
    qkv_bias: bool = False
    dtype: str = "fp32"
    attention_dropout: float = 0.0
    padding_mask: bool = False
    recompute: Optional[str] = None  # None | full | selective (core attention)
    experts: int = 0  # > 0: every layer's MLP is megatron-core's MoE layer (top-2 routing)
    seq: int = SEQ  # tokens per sequence (at most SEQ, the model's positions)
    hybrid: Optional[str] = None  # a layer pattern ("*-*-"): megatron-core's HybridModel
    softmax_type: str = "vanilla"  # vanilla | off-by-one | learnable (attention sinks)
    window_size: Optional[tuple] = None  # megatron's sliding window (left, right)


def make_config(spec: ModelSpec, tp: int, pp: int = 1, m: int = 1, sp: bool = False,
                **extra) -> MxnTransformerConfig:
    dtype = DTYPES[spec.dtype]
    if spec.recompute == "full":
        extra.update(recompute_granularity="full", recompute_method="uniform",
                     recompute_num_layers=1)
    elif spec.recompute == "selective":
        extra.update(recompute_granularity="selective", recompute_modules=["core_attn"])
    if spec.experts:
        extra.update(num_moe_experts=spec.experts, moe_router_topk=2,
                     moe_ffn_hidden_size=2 * spec.hidden, moe_token_dispatcher_type="allgather",
                     add_bias_linear=False)  # Mixtral-like; megatron has MoE bias only at ETP=1
    return MxnTransformerConfig(
        num_layers=len(spec.hybrid) if spec.hybrid else spec.num_layers, hidden_size=spec.hidden, ffn_hidden_size=4 * spec.hidden,
        num_attention_heads=spec.heads, num_query_groups=spec.kv_heads,
        kv_channels=spec.head_dim, tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp, mxn_dim_slices=m, sequence_parallel=sp,
        pipeline_dtype=dtype, params_dtype=dtype, bf16=spec.dtype == "bf16",
        fp16=spec.dtype == "fp16", hidden_dropout=0.0,
        attention_dropout=spec.attention_dropout, rotary_interleaved=spec.interleaved,
        qk_layernorm=spec.qk_norm is not None, normalization=spec.qk_norm or "LayerNorm",
        add_qkv_bias=spec.qkv_bias, use_cpu_initialization=True,
        **({"softmax_type": spec.softmax_type} if spec.softmax_type != "vanilla" else {}),
        **({"window_size": tuple(spec.window_size)} if spec.window_size else {}), **extra)


def build_model(spec: ModelSpec, config, pgs: ProcessGroupCollection, grid: bool,
                max_seq: int = SEQ, **model_extra):
    """GPTModel (HybridModel when spec.hybrid) for this rank's pipeline stage, with the grid
    spec or megatron's stock one. model_extra: more GPTModel arguments (rotary_base,
    rope_scaling, seq_len_interpolation_factor, ...)."""
    if spec.hybrid:
        return build_hybrid_model(spec, config, pgs, grid, max_seq, **model_extra)
    layer = get_gpt_layer_local_spec(num_experts=spec.experts or None,
                                     qk_layernorm=spec.qk_norm is not None,
                                     normalization=spec.qk_norm,
                                     qk_l2_norm=bool(getattr(config, "qk_l2_norm", False)))
    if getattr(config, "layernorm_zero_centered_gamma", False):
        layer = zero_centered_block_spec(layer, config.num_layers)
    if grid:
        rotary = model_rotary_percent(spec.position, spec.rotary_percent)
        layer = megatron_mxn.get_mxn_layer_spec(layer, rotary_percent=rotary)
    model = GPTModel(
        config, layer, VOCAB, max_seq,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        position_embedding_type=spec.position, rotary_percent=spec.rotary_percent,
        pg_collection=pgs, **model_extra)
    return model.to(DTYPES[spec.dtype])


class ZeroCenteredNorm(torch.nn.Module):
    """LayerNorm / RMSNorm (config.normalization) with layernorm_zero_centered_gamma: the weight
    starts at 0 and is applied as weight + 1, as megatron-core's apex FusedLayerNorm (and TE's
    norms) do. The local spec's torch norms assert the option off, and apex / TE are not
    installed here, so tests build models with this stand-in (every norm of the TP=1 model;
    every norm but the grid's own q/k norms, SlicedHeadNorm, on the grid)."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **kwargs):
        super().__init__()
        assert config.layernorm_zero_centered_gamma
        self.kind, self.shape, self.eps = config.normalization, (hidden_size,), eps
        self.weight = torch.nn.Parameter(torch.zeros(hidden_size, dtype=config.params_dtype))
        self.bias = (torch.nn.Parameter(torch.zeros(hidden_size, dtype=config.params_dtype))
                     if self.kind == "LayerNorm" else None)
        for param in self.parameters():
            setattr(param, "sequence_parallel", config.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight + 1
        if self.kind == "LayerNorm":
            return torch.nn.functional.layer_norm(x, self.shape, weight, self.bias, self.eps)
        return torch.nn.functional.rms_norm(x, self.shape, weight, self.eps)


def zero_centered_block_spec(layer, num_layers: int):
    """The local layer spec as a block spec whose norms (input, pre-MLP, final and, where the
    spec has them, q/k) are ZeroCenteredNorm."""
    from megatron.core.transformer.identity_op import IdentityOp
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    layer = copy.deepcopy(layer)
    sub = layer.submodules
    sub.input_layernorm = sub.pre_mlp_layernorm = ZeroCenteredNorm
    attn = sub.self_attention.submodules
    for name in ("q_layernorm", "k_layernorm"):
        if getattr(attn, name) not in (None, IdentityOp):
            setattr(attn, name, ZeroCenteredNorm)
    return TransformerBlockSubmodules(layer_specs=[layer] * num_layers,
                                      layer_norm=ZeroCenteredNorm)


def build_hybrid_model(spec: ModelSpec, config, pgs: ProcessGroupCollection, grid: bool,
                       max_seq: int = SEQ, **model_extra):
    """megatron-core's HybridModel on the grid's hybrid stack spec; without the grid (m = 1)
    that spec is megatron-core's local modules with megatron-core's own attention."""
    from megatron.core.models.hybrid.hybrid_model import HybridModel

    rotary = model_rotary_percent(spec.position, spec.rotary_percent)
    stack = megatron_mxn.get_mxn_hybrid_stack_spec(
        dim_slices=None if grid else 1, rotary_percent=rotary,
        qk_layernorm=spec.qk_norm is not None, normalization=spec.qk_norm,
        hybrid_layer_pattern=spec.hybrid)
    model = HybridModel(
        config, stack, VOCAB, max_seq, hybrid_layer_pattern=spec.hybrid,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        position_embedding_type=spec.position, rotary_percent=spec.rotary_percent,
        pg_collection=pgs, **model_extra)
    return model.to(DTYPES[spec.dtype])


def seed_all(seed: int = SEED) -> None:
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def batch(spec: ModelSpec, seed: int = 7) -> Dict[str, torch.Tensor]:
    """The same random batch on every rank."""
    g = torch.Generator().manual_seed(seed)
    L = spec.seq
    tokens = torch.randint(0, VOCAB, (BATCH, L), generator=g)
    labels = torch.randint(0, VOCAB, (BATCH, L), generator=g)
    mask = None
    if spec.padding_mask:
        # causal + the last 3 keys of sample 1 padded (True = masked out, megatron's convention)
        causal = torch.triu(torch.ones(L, L, dtype=torch.bool), diagonal=1)
        mask = causal.expand(BATCH, 1, L, L).clone()
        mask[1, :, :, L - 3:] = True
        mask[1, :, L - 3:, :] = causal[L - 3:]  # padded queries still see themselves
    pos = torch.arange(L).unsqueeze(0).expand(BATCH, L)
    return {"tokens": tokens, "labels": labels, "position_ids": pos, "attention_mask": mask}


def wrap_ddp(model, config, pgs):
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True,
                                               overlap_grad_reduce=False,
                                               use_distributed_optimizer=False)
    return DistributedDataParallel(config, ddp_config, model, pg_collection=pgs)


def train_step(ddp_model, config, data, pgs) -> Dict[str, Optional[torch.Tensor]]:
    """One forward/backward through megatron's schedule, then finalize_model_grads.

    Returns the full (TP-gathered) logits and the mean LM loss on the last stage, else None."""
    record = {}

    def forward_step(data_iterator, model):
        d = next(data_iterator)
        output = model(d["tokens"], d["position_ids"], d["attention_mask"])

        def loss_func(output_tensor):
            full = tensor_parallel.gather_from_tensor_model_parallel_region(
                output_tensor.detach(), group=pgs.tp)
            record["logits"] = full.float().clone()  # [b, s, V]; CE below works in place
            losses = tensor_parallel.vocab_parallel_cross_entropy(
                output_tensor.float(), d["labels"], tp_group=pgs.tp)
            loss = losses.mean()
            record["loss"] = loss.detach()
            return loss, {}

        return output, loss_func

    ddp_model.zero_grad_buffer()
    forward_backward = get_forward_backward_func()
    forward_backward(forward_step_func=forward_step, data_iterator=iter([data]),
                     model=[ddp_model], num_microbatches=1, seq_length=data["tokens"].shape[1],
                     micro_batch_size=BATCH, forward_only=False)
    finalize_model_grads([ddp_model], pg_collection=pgs)
    return record


def _main_replica(replica_id) -> bool:
    ids = replica_id if isinstance(replica_id, tuple) else (replica_id,)
    return all(r == 0 for r in ids)


def full_layout(model, tensor_of: Callable[[torch.nn.Parameter], torch.Tensor]
                ) -> Dict[str, torch.Tensor]:
    """Assemble, on every rank, the full (TP=1) tensor of every parameter under its checkpoint
    key, from each rank's local `tensor_of(param)`, using the model's own sharded_state_dict."""
    params = {id(p): p for p in model.parameters()}
    shards = []
    for item in nested_values(model.sharded_state_dict()):
        if isinstance(item, ShardedObject) or id(item.data) not in params:
            continue
        local = tensor_of(params[id(item.data)])
        if isinstance(item, ShardedTensorFactory):
            pieces = dataclasses.replace(item, data=local).build()
        else:
            pieces = [dataclasses.replace(item, data=local, dtype=local.dtype)]
        shards += [p for p in pieces if isinstance(p, ShardedTensor)]
    # Agree on the set of keys and shapes (PP stages hold different ones).
    meta = {s.key: s.global_shape for s in shards}
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, meta)
    keys = sorted({k: v for m in everyone for k, v in m.items()}.items())
    out = {k: torch.zeros(shape, dtype=torch.float64) for k, shape in keys}
    for s in shards:
        if _main_replica(s.replica_id):
            index = tuple(slice(o, o + n) for o, n in
                          zip(s.global_offset, (1,) * s.prepend_axis_num + tuple(s.local_shape)))
            out[s.key][index] += s.data.detach().double().reshape(
                (1,) * s.prepend_axis_num + tuple(s.local_shape))
    for k in out:
        dist.all_reduce(out[k])
    return out


def save(model, path: str) -> None:
    dist_checkpointing.save(model.sharded_state_dict(), path)


def load(model, path: str) -> None:
    state = dist_checkpointing.load(model.sharded_state_dict(), path)
    model.load_state_dict(state, strict=False)


def max_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|: the worst element's error relative to the tensor's scale."""
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def l2_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||: the error of the tensor as a whole (used for bf16, whose per-element
    rounding differs between any two correct implementations)."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@torch.no_grad()
def load_full(model, full: Dict[str, torch.Tensor]) -> None:
    """Copy every parameter's shard out of `full` (checkpoint key -> the full TP=1 tensor, as
    full_layout returns it), through the model's own sharded_state_dict: the in-memory
    equivalent of saving a TP=1 checkpoint and loading it, without dist-checkpointing's
    seconds of I/O per case."""
    params = {id(p): p for p in model.parameters()}
    loaded = set()
    for item in nested_values(model.sharded_state_dict()):
        if isinstance(item, ShardedObject) or id(item.data) not in params:
            continue
        pieces = item.build() if isinstance(item, ShardedTensorFactory) else [item]
        for s in pieces:
            if not isinstance(s, ShardedTensor):
                continue
            index = tuple(slice(o, o + n) for o, n in
                          zip(s.global_offset, (1,) * s.prepend_axis_num + tuple(s.local_shape)))
            s.data.copy_(full[s.key][index].reshape(s.data.shape))
        loaded.add(id(item.data))
    missing = [n for n, p in model.named_parameters() if id(p) not in loaded]
    assert not missing, f"parameters without a checkpoint key: {missing}"


# ---- one grid (or TP) model in a worker rank, for the decode, engine and option cases
PROMPT_LENGTH = 8


def init_grid(n: int, m: int, grid: bool):
    """Grid n x m, or plain TP = n*m (the grid's groups exist but the stock spec is used)."""
    return megatron_mxn.initialize_mxn_parallel(n, m, create_gloo_process_groups=False)


def teardown():
    from megatron.core.inference.utils import InferenceMode

    InferenceMode.unset_active()  # megatron's engine leaves it set: later training would fail
    megatron_mxn.destroy_mxn_parallel(destroy_model_parallel=True)


def grid_model(spec: ModelSpec, n: int, m: int, grid: bool, seed: int = 1234,
           schedule: str = "exact"):
    pgs = init_grid(n, m, grid)
    seed_all(seed)  # loads must overwrite each layout's different random init
    config = make_config(spec, tp=n * m, m=m if grid else 1, mxn_attention=schedule)
    return build_model(spec, config, pgs, grid=grid, max_seq=64), pgs


def random_prompt(batch: int = 2, length: int = PROMPT_LENGTH):
    return torch.randint(0, 128, (batch, length), generator=torch.Generator().manual_seed(3))
