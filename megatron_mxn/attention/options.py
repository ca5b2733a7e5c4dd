"""Every megatron-core attention option, classified for the grid attention.

Each field of megatron-core's TransformerConfig (with those of ModelParallelConfig it inherits),
each field MxnTransformerConfig adds, each GPTModel / HybridModel constructor parameter and each
parameter of the static inference context is one of:

- ORTHOGONAL: it does not touch what the grid attention computes (MLP, MoE, norms outside
  attention, parallelism, communication and performance settings, initialization, ...), or it is
  read only together with an option that is refused;
- SUPPORTED: the grid computes it exactly; `test` names the test that proves it
  ("tests/FILE.py::test_name" or "...::test_name[param]");
- REFUSED: a value for which `when(value, config)` holds is refused at model build time, on every
  rank and before any collective (MxnSelfAttention.__init__ calls check_config first; the
  Megatron-LM entry points call it while they build the model config), with an MxnConfigError
  naming the option.

MLATransformerConfig's own fields are classified in MLA_OPTIONS; MLA_RESTRICTIONS lists the
options the grid computes for standard attention but not yet for MLA (check_mla_config).

tests/test_options_audit.py fails when megatron-core gains a field this table does not classify,
when a SUPPORTED entry names a test that does not exist, or when a REFUSED option is not refused.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional

from megatron_mxn.grid.layout import MxnConfigError

ORTHOGONAL, SUPPORTED, REFUSED = "orthogonal", "supported", "refused"


@dataclass(frozen=True)
class Option:
    kind: str
    why: str = ""  # ORTHOGONAL: the reason; REFUSED: the refusal's explanation; SUPPORTED: a note
    test: str = ""  # SUPPORTED: the test proving it exact
    when: Optional[Callable[[Any, Any], bool]] = None  # REFUSED: (value, config) -> refuse?
    example: Any = True  # REFUSED: a value that is refused (tests/test_options_audit.py)

    def message(self, name: str, value: Any) -> str:
        shown = str(value) if isinstance(value, enum.Enum) else repr(value)
        return f"{name}={shown} is not supported by the grid attention: {self.why}"


def _set(value, config) -> bool:
    return bool(value)


def _not_none(value, config) -> bool:
    return value is not None


def orth(why: str) -> Option:
    return Option(ORTHOGONAL, why)


def supp(test: str, why: str = "") -> Option:
    return Option(SUPPORTED, why, test=test)


def refused(why: str, when: Callable[[Any, Any], bool] = _set, example: Any = True) -> Option:
    return Option(REFUSED, why, when=when, example=example)


# --- tests that prove options exact ---------------------------------------------------------
EQ = "tests/test_equivalence.py::test_fp32_matches_tp1"
HALF = "tests/test_equivalence.py::test_half_precision_matches_tp1"
WINDOW = "tests/test_attention_options.py::test_sliding_window_matches_tp1"
SINKS = "tests/test_attention_options.py::test_attention_sinks_match_tp1"
ROPE = "tests/test_rope_variants.py::test_rope_variant_matches_tp1"
DECODE = "tests/test_runtime.py::test_decode_with_kv_cache_matches_tp1"
DROPOUT = "tests/test_runtime.py::test_dropout_is_shared_by_the_dim_slice_group"
HYBRID = "tests/test_hybrid.py::test_hybrid_fp32_matches_tp1"
SCHEDULES = "tests/test_schedules.py::test_exact_schedules_match_tp1"
DYNAMIC_REFUSED = "tests/test_engine.py::test_dynamic_engine_is_refused_at_construction"
MLA_EQ = "tests/test_mla.py::test_mla_matches_tp1"
MLA_DECODE = "tests/test_mla.py::test_mla_decode_matches_tp1"

# --- reasons shared by many entries ----------------------------------------------------------
PARALLEL = "parallel layout / communication outside the attention core"
PP = "pipeline-parallel schedule and layout; attention layers are unchanged"
PERF = "performance setting of modules other than the attention core; same math"
INIT = "weight initialization"
MOE = "MoE / expert layers, not attention"
MLP = "MLP / activation, not attention"
MTP = "read only with multi-token prediction (mtp_num_layers, refused)"
CP = "read only with context parallelism (context_parallel_size > 1, refused)"
GRAPHS = "read only with CUDA graphs (cuda_graph_impl / enable_cuda_graph, refused)"
DSA = "read only by experimental_attention_variant='dsa' (refused)"
LINEAR_ATTN = ("gated-delta-net linear attention (hybrid 'G' layers or experimental_attention_"
               "variant, refused): not the grid's softmax attention")
MAMBA = "Mamba layers of hybrid models, not attention"
LOW_PRECISION = ("precision of the linear layers (TE); the grid's QKV/proj linears are "
                 "megatron's own and its core runs at the activations' dtype")
OFFLOAD = "activation offloading: moves tensors, same math"
INFERENCE_KERNELS = "inference kernels / communication outside the attention core"

MROPE = ("multimodal RoPE (mRoPE) rotates dim sections by three position axes (temporal, "
         "height, width); the grid's dim slicing of those frequencies is untested")


def _local_backend(value, config) -> bool:
    return getattr(value, "name", value) == "local"


def _weight_shards(value, config) -> bool:
    return value is not None and value != config.tensor_model_parallel_size


TRANSFORMER_OPTIONS: Dict[str, Option] = {
    # ---- ModelParallelConfig
    "tensor_model_parallel_size": supp(EQ + "[2x2]", "the grid is the TP group, n*m ranks"),
    "tensor_parallel_num_weight_shards": refused(
        "generalized tensor parallelism shards weights beyond the TP group; the grid's "
        "linear_qkv/linear_proj rows are a TP rank's (see the design's weight layout)",
        _weight_shards, 8),
    "gtp_weight_remat_size": refused(
        "generalized tensor parallelism (weight rematerialization over a GTP axis) is untested "
        "with the grid's weight layout", lambda v, c: v > 1, 2),
    "pipeline_model_parallel_comm_backend": orth(PP),
    "pipeline_model_parallel_size": supp(EQ + "[pp2_grid_2x2]"),
    "virtual_pipeline_model_parallel_size": orth(PP),
    "sequence_parallel": supp(EQ + "[sequence_parallel_2x2]"),
    "context_parallel_size": refused(
        "context parallelism cannot be combined with the grid attention (both split the "
        "attention of one sequence)", lambda v, c: v > 1, 2),
    "hierarchical_context_parallel_sizes": orth(CP),
    "max_seqlen_per_dp_cp_rank": orth("read only with hybrid_context_parallel (refused)"),
    "hybrid_context_parallel": refused(
        "hybrid context parallelism (packed variable-length samples over DP x CP ranks) is not "
        "implemented by the grid attention (no packed sequences, no CP)"),
    "expert_model_parallel_size": orth(MOE),
    "expert_tensor_parallel_size": orth(MOE),
    "expert_tensor_parallel_num_weight_shards": orth(MOE),
    "expert_gtp_weight_remat_size": orth(MOE),
    "perform_initialization": orth(INIT),
    "use_cpu_initialization": orth(INIT),
    "fp16": supp(HALF + "[2x2-fp16]"),
    "bf16": supp(HALF + "[2x2-bf16]"),
    "params_dtype": supp(HALF + "[2x2-bf16]"),
    "timers": orth("timing callback"),
    "finalize_model_grads_func": orth(
        "grad reduction callback; megatron's finalize_model_grads sums the grid's q/k-norm "
        "grads exactly (tests/test_equivalence.py)"),
    "grad_scale_func": orth("loss-scaling callback"),
    "moe_grad_scale_func": orth(MOE),
    "mtp_grad_scale_func": orth(MTP),
    "no_sync_func": orth("DDP callback"),
    "grad_sync_func": orth("DDP callback"),
    "param_sync_func": orth("DDP callback"),
    "deterministic_mode": orth("kernel determinism flag; the grid's collectives are fixed-order"),
    "enable_autocast": refused(
        "under torch.autocast the grid's partial attention scores would be rounded to the "
        "autocast dtype before they are summed over the dim slices (they are reduced in fp32)"),
    "autocast_dtype": orth("read only with enable_autocast (refused)"),
    "num_microbatches_with_partial_activation_checkpoints": orth("activation recomputation "
                                                                 "schedule"),
    "gradient_accumulation_fusion": orth(PERF),
    "use_te_rng_tracker": orth("which RNG tracker; the grid adds its head-group dropout stream "
                               "to the tracker in use"),
    "tp_comm_overlap": orth("TE comm/GEMM overlap inside linear_qkv/linear_proj: the same "
                            "math as the TP linears the grid uses unchanged"),
    "tp_comm_bulk_wgrad": orth(PERF),
    "tp_comm_bulk_dgrad": orth(PERF),
    "tp_comm_overlap_ag": orth(PERF),
    "tp_comm_overlap_rs": orth(PERF),
    "tp_comm_overlap_rs_dgrad": orth(PERF),
    "tp_comm_split_ag": orth(PERF),
    "tp_comm_atomic_ag": orth(PERF),
    "tp_comm_split_rs": orth(PERF),
    "tp_comm_atomic_rs": orth(PERF),
    "cross_entropy_loss_fusion": orth("loss kernel"),
    "cross_entropy_fusion_impl": orth("loss kernel"),
    "tp_comm_overlap_disable_qkv": orth(PERF),
    "tp_comm_overlap_disable_fc1": orth(PERF),
    "tp_comm_bootstrap_backend": orth(PERF),
    "overlap_moe_expert_parallel_comm": orth(MOE),
    "delay_wgrad_compute": orth(PERF),
    "overlap_dispatch_backward_with_experts_wgrad": orth(MOE),
    "ep_overlap_early_attn_memory_release": orth(MOE),
    "pipeline_dtype": orth(PP),
    "variable_seq_lengths": orth(PP),
    "overlap_p2p_comm": orth(PP),
    "batch_p2p_comm": orth(PP),
    "batch_p2p_sync": orth(PP),
    "use_ring_exchange_p2p": orth(PP),
    "deallocate_pipeline_outputs": orth(PP),
    "defer_embedding_wgrad_compute": orth(PERF),
    "wgrad_deferral_limit": orth(PERF),
    "overlap_p2p_comm_warmup_flush": orth(PP),
    "microbatch_group_size_per_vp_stage": orth(PP),
    "mtp_standalone": orth(MTP),
    "cpu_offloading": orth(OFFLOAD),
    "cpu_offloading_num_layers": orth(OFFLOAD),
    "_cpu_offloading_context": orth(OFFLOAD),
    "cpu_offloading_activations": orth(OFFLOAD),
    "cpu_offloading_weights": orth(OFFLOAD),
    "cpu_offloading_double_buffering": orth(OFFLOAD),
    "cpu_offloading_retain_pinned_cpu_buffers": orth(OFFLOAD),
    "barrier_with_L1_time": orth("timing"),
    # ---- TransformerConfig: model shape
    "num_layers": orth("model depth"),
    "mtp_num_layers": refused(
        "multi-token prediction layers are built from megatron's stock layer specs "
        "(megatron.training's mtp_block_spec), not the grid's; untested on the grid",
        _set, 1),
    "mtp_loss_scaling_factor": orth(MTP),
    "mtp_use_repeated_layer": orth(MTP),
    "mtp_detach_heads": orth(MTP),
    "mtp_hybrid_override_pattern": orth(MTP),
    "num_layers_in_first_pipeline_stage": orth(PP),
    "num_layers_in_last_pipeline_stage": orth(PP),
    "pipeline_model_parallel_layout": orth(PP),
    "account_for_embedding_in_pipeline_split": orth(PP),
    "account_for_loss_in_pipeline_split": orth(PP),
    "hidden_size": supp(EQ + "[2x2]"),
    "num_attention_heads": supp(EQ + "[mha_2x2]"),
    "attention_backend": refused(
        "megatron.training's GPTModelBuilder replaces the layer spec's core_attention by "
        "megatron's DotProductAttention, which would attend over d/m dims per head with the "
        "wrong softmax scale; use auto (flash/fused/unfused/auto only pick Transformer Engine "
        "kernels, which the grid's own core does not use)", _local_backend, "local"),
    "flash_attention_version": orth("flash-attn version of megatron's dynamic-batching "
                                    "kernels, refused on the grid; no effect on its core"),
    "softmax_scale": supp(ROPE),
    "softmax_type": supp(SINKS, "vanilla, off-by-one and learnable sinks"),
    "num_query_groups": supp(EQ + "[gqa_n_gt_g_4x2]", "also mqa_2x2, mha_2x2"),
    "ffn_hidden_size": orth(MLP),
    "kv_channels": supp(EQ + "[2x2]", "the tests use kv_channels != hidden/heads"),
    "hidden_dropout": orth("dropout outside attention"),
    "attention_dropout": supp(DROPOUT, "one stream per head group, shared by its m ranks"),
    "fp32_residual_connection": orth("residual stream, outside attention"),
    "apply_residual_connection_post_layernorm": orth("residual stream, outside attention"),
    "layernorm_epsilon": supp(EQ + "[qk_layernorm_2x2]", "the q/k norms' eps"),
    "layernorm_zero_centered_gamma": supp(ROPE, "also the grid's q/k norms"),
    "add_bias_linear": supp(EQ + "[2x2]", "linear_proj / linear_qkv bias (default on)"),
    "add_qkv_bias": supp(EQ + "[qkv_bias_2x2]"),
    "gated_linear_unit": orth(MLP),
    "activation_func": orth(MLP),
    "activation_func_fp8_input_store": orth(MLP),
    "glu_linear_offset": orth(MLP),
    "activation_func_clamp_value": orth(MLP),
    "num_moe_experts": orth(MOE),
    "rotary_interleaved": supp(EQ + "[rope_interleaved_2x2]"),
    "window_size": supp(WINDOW),
    "window_attn_skip_freq": supp(WINDOW),
    "normalization": supp(EQ + "[qk_rmsnorm_1x4]", "the q/k norms' kind"),
    "qk_layernorm": supp(EQ + "[qk_layernorm_2x2]"),
    "qk_l2_norm": supp(ROPE),
    "qk_clip": refused(
        "QK-clip needs the per-head max attention logit that megatron's optimizer step reads "
        "from core_attention.current_max_attn_logits; the grid's core does not compute it"),
    "qk_clip_alpha": orth("read only with qk_clip (refused)"),
    "qk_clip_threshold": orth("read only with qk_clip (refused)"),
    "log_max_attention_logit": refused(
        "megatron's training loop reads the per-head max attention logit from "
        "core_attention.current_max_attn_logits; the grid's core does not compute it"),
    "attention_output_gate": refused(
        "the gated attention output (a sigmoid gate from extra linear_qkv rows) is not laid "
        "out on the grid"),
    "test_mode": refused(
        "megatron's real-time consistency checks of the q/k norm weights run in its own "
        "get_query_key_value_tensors, which the grid replaces; they would silently not run"),
    "calculate_per_token_loss": orth("loss reduction"),
    "multi_latent_attention": supp(
        MLA_EQ + "[q_lora_yarn_2x2]",
        "with megatron's MLA layer spec: the grid's MxnMLASelfAttention (attention/mla.py); "
        "its own options: MLA_OPTIONS and MLA_RESTRICTIONS"),
    "no_rope_freq": supp(ROPE),
    "experimental_attention_variant": refused(
        "experimental attention variants (DSA, gated delta net) replace the softmax attention "
        "the grid computes", _not_none, "dsa"),
    "experimental_attention_variant_loss_scale_func": orth(DSA),
    "dsa_indexer_n_heads": orth(DSA),
    "dsa_indexer_head_dim": orth(DSA),
    "dsa_indexer_topk": orth(DSA),
    "dsa_indexer_topk_freq": orth(DSA),
    "dsa_indexer_skip_topk_offset": orth(DSA),
    "dsa_indexer_loss_coeff": orth(DSA),
    "dsa_indexer_use_sparse_loss": orth(DSA),
    "dsa_kernel_backend": orth(DSA),
    "dsa_indexer_rope_interleaved": orth(DSA),
    "dsa_indexer_rotate_activation": orth(DSA),
    "dsa_indexer_scoring_relu": orth(DSA),
    "dsa_indexer_k_norm_epsilon": orth(DSA),
    "dsa_indexer_k_norm_fp32": orth(DSA),
    "linear_attention_freq": orth(LINEAR_ATTN),
    "linear_conv_kernel_dim": orth(LINEAR_ATTN),
    "linear_key_head_dim": orth(LINEAR_ATTN),
    "linear_value_head_dim": orth(LINEAR_ATTN),
    "linear_num_key_heads": orth(LINEAR_ATTN),
    "linear_num_value_heads": orth(LINEAR_ATTN),
    # ---- initialization, muP
    "init_method": orth(INIT),
    "output_layer_init_method": orth(INIT),
    "init_method_std": orth(INIT),
    "embedding_init_method": orth(INIT),
    "embedding_init_method_std": orth(INIT),
    "init_model_with_meta_device": refused(
        "meta-device initialization is untested with the grid's q/k norm weights and dim-index "
        "buffers"),
    "use_mup": supp(ROPE, "its attention part is softmax_scale, set in __post_init__; the "
                          "rest is init and embedding/output scaling"),
    "mup_width_mult": orth("muP embedding/output scaling and init"),
    "mup_base_hidden_size": orth("muP embedding/output scaling and init"),
    "mup_embedding_mult": orth("muP embedding scaling"),
    "mup_output_mult": orth("muP output scaling"),
    "mup_base_head_dim": supp(ROPE, "only sets softmax_scale (with use_mup)"),
    "mup_attn_scale_power": supp(ROPE, "only sets softmax_scale (with use_mup)"),
    "apply_query_key_layer_scaling": supp(
        ROPE, "scores scaled by 1/layer_number, the softmax by layer_number: the grid keeps "
              "both factors (scale_mask_softmax.scale) on every schedule"),
    "attention_softmax_in_fp32": orth("precision only: the grid's scores and softmax are "
                                      "fp32 whatever its value"),
    "disable_bf16_reduced_precision_matmul": orth("matmul precision flag"),
    # ---- fusions
    "bias_activation_fusion": orth(MLP),
    "masked_softmax_fusion": orth("the grid's score schedules use megatron's torch softmax "
                                  "path (same math as the fused kernel)"),
    "persist_layer_norm": orth(PERF),
    "memory_efficient_layer_norm": orth(PERF),
    "bias_dropout_fusion": orth(PERF),
    "apply_rope_fusion": refused(
        "Transformer Engine's fused RoPE kernel on the grid's sliced rotary dims is untested "
        "(the Megatron-LM entry points turn it off on the grid; RoPE then runs unfused, "
        "exactly)"),
    "use_fused_weighted_squared_relu": orth(MLP),
    "fused_single_qkv_rope": refused(
        "the fused QKV+RoPE kernel works on megatron's TP layout of the unsplit QKV tensor, "
        "not the grid's dim slices"),
    "fused_residual_rmsnorm": orth("residual + norm outside attention"),
    "use_transformer_engine_op_fuser": orth(MLP),
    # ---- recomputation
    "recompute_granularity": supp(EQ + "[recompute_full_2x2]"),
    "recompute_method": supp(EQ + "[recompute_full_2x2]"),
    "recompute_num_layers": supp(EQ + "[recompute_full_2x2]"),
    "distribute_saved_activations": orth(PERF),
    "recompute_modules": supp(EQ + "[recompute_selective_1x4]"),
    # ---- low precision
    "fp8": orth(LOW_PRECISION),
    "fp8_recipe": orth(LOW_PRECISION),
    "fp8_param": orth(LOW_PRECISION),
    "fp8_quantizer_factory": orth(LOW_PRECISION),
    "fp8_margin": orth(LOW_PRECISION),
    "fp8_interval": orth(LOW_PRECISION),
    "fp8_amax_history_len": orth(LOW_PRECISION),
    "fp8_amax_compute_algo": orth(LOW_PRECISION),
    "fp8_wgrad": orth(LOW_PRECISION),
    "fp8_output_proj": orth(LOW_PRECISION),
    "fp8_dot_product_attention": refused(
        "FP8 attention is Transformer Engine's core attention, which the grid replaces by its "
        "own; it would silently not run"),
    "fp8_multi_head_attention": refused(
        "FP8 multi-head attention is Transformer Engine's, which the grid replaces by its own; "
        "it would silently not run"),
    "tp_only_amax_red": orth(LOW_PRECISION),
    "first_last_layers_bf16": orth(LOW_PRECISION),
    "num_layers_at_start_in_bf16": orth(LOW_PRECISION),
    "num_layers_at_end_in_bf16": orth(LOW_PRECISION),
    "use_kitchen": orth(LOW_PRECISION),
    "use_kitchen_attention": refused(
        "Kitchen's attention replaces the core attention, which the grid replaces by its own; "
        "it would silently not run"),
    "kitchen_attention_backend": orth("read only with use_kitchen_attention (refused)"),
    "fp4": orth(LOW_PRECISION),
    "fp4_recipe": orth(LOW_PRECISION),
    "fp4_param": orth(LOW_PRECISION),
    "fp4_quantizer_factory": orth(LOW_PRECISION),
    # ---- MoE
    "high_priority_a2a_comm_stream": orth(MOE),
    "moe_shared_expert_intermediate_size": orth(MOE),
    "moe_shared_expert_gate": orth(MOE),
    "moe_shared_expert_overlap": orth(MOE),
    "use_grouped_gemm_for_shared_expert": orth(MOE),
    "moe_shared_expert_glu_interleave_size": orth(MOE),
    "moe_layer_freq": orth(MOE),
    "moe_ffn_hidden_size": orth(MOE),
    "moe_router_load_balancing_type": orth(MOE),
    "moe_router_topk": orth(MOE),
    "moe_enable_routing_replay": orth(MOE),
    "moe_router_topk_limited_devices": orth(MOE),
    "moe_router_padding_for_quantization": orth(MOE),
    "moe_router_padding_for_fp8": orth(MOE),
    "moe_router_num_groups": orth(MOE),
    "moe_router_group_topk": orth(MOE),
    "moe_router_pre_softmax": orth(MOE),
    "moe_router_topk_scaling_factor": orth(MOE),
    "moe_router_score_function": orth(MOE),
    "moe_router_dtype": orth(MOE),
    "moe_router_enable_expert_bias": orth(MOE),
    "moe_router_bias_update_rate": orth(MOE),
    "moe_router_quantile_balancing_ema": orth(MOE),
    "moe_router_force_load_balancing": orth(MOE),
    "moe_router_force_biased": orth(MOE),
    "use_grouped_gemm_for_dense_mlp": orth(MLP),
    "moe_grouped_gemm": orth(MOE),
    "moe_single_grouped_weight": orth(MOE),
    "moe_single_grouped_bias": orth(MOE),
    "moe_aux_loss_coeff": orth(MOE),
    "moe_z_loss_coeff": orth(MOE),
    "moe_input_jitter_eps": orth(MOE),
    "moe_token_dropping": orth(MOE),
    "moe_token_dispatcher_type": orth(MOE),
    "moe_enable_deepep": orth(MOE),
    "moe_flex_dispatcher_backend": orth(MOE),
    "moe_permute_fusion_into_hybridep": orth(MOE),
    "moe_hybridep_pad_uneven_dispatch_inputs": orth(MOE),
    "moe_per_layer_logging": orth(MOE),
    "moe_expert_capacity_factor": orth(MOE),
    "moe_pad_expert_input_to_capacity": orth(MOE),
    "moe_pad_experts_for_cuda_graph_inference": orth(MOE),
    "moe_token_drop_policy": orth(MOE),
    "moe_layer_recompute": orth(MOE),
    "moe_permute_fusion": orth(MOE),
    "moe_router_fusion": orth(MOE),
    "moe_apply_probs_on_input": orth(MOE),
    "moe_latent_size": orth(MOE),
    "moe_flex_dispatcher_num_sms": orth(MOE),
    "moe_deepep_num_sms": orth(MOE),
    "moe_hybridep_num_sms": orth(MOE),
    "moe_hybridep_num_blocks_permute": orth(MOE),
    "moe_hybridep_num_blocks_unpermute": orth(MOE),
    "moe_hybridep_num_sms_preprocessing": orth(MOE),
    "moe_ncclep_static_shape": orth(MOE),
    "moe_ncclep_zero_copy": orth(MOE),
    "moe_mlp_glu_interleave_size": orth(MOE),
    "moe_expert_rank_capacity_factor": orth(MOE),
    # ---- context parallelism, CUDA graphs
    "cp_comm_type": orth(CP + "; Megatron-LM sets 'p2p' by default"),
    "enable_cuda_graph": refused(
        "CUDA-graph capture of the grid attention (its per-shape schedule choice and "
        "dim-slice collectives) is untested"),
    "cuda_graph_use_single_mempool": orth(GRAPHS),
    "cuda_graph_retain_backward_graph": orth(GRAPHS),
    "cuda_graph_warmup_steps": orth(GRAPHS),
    "external_cuda_graph": refused(
        "CUDA-graph capture of the grid attention (its per-shape schedule choice and "
        "dim-slice collectives) is untested"),
    "cuda_graph_impl": refused(
        "CUDA-graph capture of the grid attention (its per-shape schedule choice and "
        "dim-slice collectives) is untested", lambda v, c: v not in (None, "none"), "local"),
    "cuda_graph_modules": orth(GRAPHS),
    "inference_cuda_graph_scope": orth(GRAPHS),
    "cuda_graph_scope": orth(GRAPHS),
    # ---- misc, inference
    "clone_scatter_output_in_embedding": orth("embedding"),
    "disable_parameter_transpose_cache": orth(PERF),
    "config_logger_dir": orth("logging"),
    "flash_decode": refused(
        "megatron's flash-decode kernel works on its own TP-layout KV cache; the grid has "
        "its own (dim-sliced or position-sharded) caches"),
    "batch_invariant_mode": refused(
        "batch invariance is promised for megatron's pinned FlashAttention kernels, which the "
        "grid's core does not use; the grid's kernels make no such promise"),
    "use_te_activation_func": orth(MLP),
    "inference_rng_tracker": orth("sampling RNG"),
    "inference_sampling_seed": orth("sampling RNG"),
    "symmetric_ar_type": orth(INFERENCE_KERNELS),
    "nccl_all_reduce_for_prefill": orth(INFERENCE_KERNELS),
    "use_inference_optimized_layers": orth(
        "not read by megatron-core 0.19 (transformer_impl='inference_optimized', refused, is "
        "the switch)"),
    "inference_fuse_tp_communication": refused(
        "fused TP communication of megatron's inference-optimized layers is untested with the "
        "grid (it needs transformer_impl='inference_optimized', refused too)"),
    "inference_disable_triton_nvls_kernels": orth(
        "read only with transformer_impl='inference_optimized' (refused)"),
    "inference_grouped_gemm_backend": orth(MOE),
    "inference_moe_disable_fused_quant_kernels": orth(MOE),
    "inference_moe_token_dispatcher_type": orth(MOE),
    "mrope_section": refused(
        "it configures position_embedding_type='mrope', which the grid refuses: " + MROPE,
        _not_none, [2, 2, 4]),
    "is_hybrid_model": supp(HYBRID),
    "mamba_state_dim": orth(MAMBA),
    "mamba_head_dim": orth(MAMBA),
    "mamba_num_groups": orth(MAMBA),
    "mamba_num_heads": orth(MAMBA),
    "mamba_training_ssm_states_dtype": orth(MAMBA),
    "use_mamba_mem_eff_path": orth(MAMBA),
    "mlp_chunks_for_prefill": orth(MLP),
    "mlp_chunks_for_training": orth(MLP),
    "heterogeneous_block_specs": refused(
        "heterogeneous per-layer block specs (megatron's heterogeneous layer builder) are "
        "untested with the grid attention"),
    "hetereogenous_dist_checkpoint": orth("read only with heterogeneous_block_specs (refused)"),
    "quant_recipe": refused(
        "per-module quantization recipes are untested with the grid's linear/core layout",
        _not_none, "recipe"),
    "transformer_impl": refused(
        "megatron's inference-optimized layers (fused TP communication) are untested with the "
        "grid; 'local' and 'transformer_engine' are supported",
        lambda v, c: v == "inference_optimized", "inference_optimized"),
    "fine_grained_activation_offloading": orth(OFFLOAD),
    "offload_modules": orth(OFFLOAD),
    "min_offloaded_tensor_size": orth(OFFLOAD),
    "delay_offload_until_cuda_graph": orth(OFFLOAD),
    "delta_offload_bytes_across_pp_ranks": orth(OFFLOAD),
    "activation_offload_fraction": orth(OFFLOAD),
    "moe_paged_stash": orth(MOE),
    "moe_paged_stash_page_size": orth(MOE),
    "moe_paged_stash_buffer_size_factor_cuda": orth(MOE),
    "moe_paged_stash_buffer_size_factor_cpu": orth(MOE),
    "fine_grained_offloading_max_inflight_offloads": orth(OFFLOAD),
    # ---- MxnTransformerConfig
    "mxn_dim_slices": supp(EQ + "[2x2]"),
    "mxn_attention": supp(SCHEDULES, "exact, gather, seq, auto; 'sliced' is the seed paper's "
                                     "different model (tests/test_schedules.py)"),
    "mxn_kv_cache": supp(DECODE),
}

# GPTModel / HybridModel constructor parameters, and the YaRN attributes megatron.training sets
# on the config for position_embedding_type='yarn' (not dataclass fields).
MODEL_OPTIONS: Dict[str, Option] = {
    "config": orth("the TransformerConfig (TRANSFORMER_OPTIONS)"),
    "transformer_layer_spec": orth("the grid spec (get_mxn_layer_spec); its core_attention is "
                                   "checked by check_core_attention"),
    "hybrid_stack_spec": orth("the grid's hybrid stack spec (get_mxn_hybrid_stack_spec)"),
    "vocab_size": orth("embedding"),
    "max_sequence_length": orth("embedding / RoPE table length"),
    "pre_process": orth(PP),
    "post_process": orth(PP),
    "fp16_lm_cross_entropy": orth("loss"),
    "parallel_output": orth("output layer"),
    "share_embeddings_and_output_weights": orth("embedding"),
    "position_embedding_type": refused(MROPE, lambda v, c: v == "mrope", "mrope"),
    "rotary_percent": supp(EQ + "[rope_half_1x4]"),
    "rotary_base": supp(ROPE),
    "rope_scaling": supp(ROPE),
    "rope_scaling_factor": supp(ROPE),
    "scatter_embedding_sequence_parallel": orth("embedding"),
    "seq_len_interpolation_factor": supp(ROPE),
    "mtp_block_spec": orth(MTP),
    "pg_collection": orth(PARALLEL),
    "vp_stage": orth(PP),
    "hybrid_layer_pattern": supp(HYBRID),
    "hybrid_attention_ratio": orth("deprecated hybrid layer allocation"),
    "hybrid_mlp_ratio": orth("deprecated hybrid layer allocation"),
    "hybrid_override_pattern": orth("deprecated alias of hybrid_layer_pattern"),
    "yarn_rotary_scaling_factor": supp(ROPE),
    "yarn_original_max_position_embeddings": supp(ROPE),
    "yarn_beta_fast": supp(ROPE),
    "yarn_beta_slow": supp(ROPE),
    "yarn_mscale": supp(ROPE),
    "yarn_mscale_all_dim": supp(ROPE),
    "yarn_correction_range_round_to_int": supp(ROPE),
}
YARN_ATTRIBUTES = tuple(k for k in MODEL_OPTIONS if k.startswith("yarn_"))

# The fields megatron-core's MLATransformerConfig adds to TransformerConfig (multi-latent
# attention on the grid: attention/mla.py).
MLA_ROPE = MLA_EQ + "[rope_2x2_seq]"
MLA_YARN = MLA_EQ + "[q_lora_yarn_2x2]"
MLA_OPTIONS: Dict[str, Option] = {
    "q_lora_rank": supp(MLA_EQ + "[q_lora_yarn_2x2-no_q_lora_yarn_1x4]",
                        "set: linear_q_down_proj (as megatron has it) + linear_q_up_proj on the "
                        "grid; None: linear_q_proj on the grid"),
    "kv_lora_rank": supp(MLA_YARN, "the kv latent: megatron's down-projection and norm"),
    "qk_head_dim": supp(MLA_YARN, "split over the dim slices"),
    "qk_pos_emb_head_dim": supp(MLA_YARN, "split over the dim slices in whole RoPE pairs"),
    "v_head_dim": supp(MLA_YARN, "split over the dim slices"),
    "rope_type": supp(MLA_EQ + "[rope_2x2_seq-q_lora_yarn_2x2]"),
    "rotary_base": supp(MLA_ROPE),
    "rotary_percent": refused(
        "MLA's plain RoPE over part of qk_pos_emb_head_dim is untested on the grid",
        lambda v, c: getattr(c, "rope_type", "yarn") == "rope" and v != 1.0, 0.5),
    "rotary_scaling_factor": supp(MLA_YARN),
    "original_max_position_embeddings": supp(MLA_YARN),
    "beta_fast": supp(MLA_YARN),
    "beta_slow": supp(MLA_YARN),
    "mscale": supp(MLA_YARN, "YaRN's mscale of the RoPE dims and of the softmax scale"),
    "mscale_all_dim": supp(MLA_YARN),
    "cache_mla_latents": supp(
        MLA_DECODE, "the grid's MLA inference always caches the latent, sharded by position "
        "over the n*m ranks, with absorbed queries (mla_decode.py); megatron's own absorption "
        "(dynamic engine, FlashMLA) is not used"),
    "mla_down_proj_fusion": refused(
        "FusedMLASelfAttention (fused q/kv down-projection with the input norm) is not "
        "laid out on the grid"),
}
# TransformerConfig options the grid computes for standard attention but not (yet) for MLA.
MLA_RESTRICTIONS: Dict[str, Option] = {
    "rotary_interleaved": refused(
        "megatron's MLA RoPE with interleaved rotate-half is untested on the grid"),
    "window_size": refused("sliding-window MLA is untested on the grid", _not_none, (4, 0)),
    "softmax_type": refused("attention sinks with MLA are untested on the grid",
                            lambda v, c: v != "vanilla", "learnable"),
    "recompute_modules": refused(
        "recomputing MLA's up-projections ('mla_up_proj') runs megatron's own up-projection "
        "code, which the grid replaces", lambda v, c: "mla_up_proj" in (v or ()),
        ["mla_up_proj"]),
    "mxn_attention": refused(
        "'sliced' is the seed paper's per-slice softmax, not MLA",
        lambda v, c: v == "sliced", "sliced"),
    "mxn_kv_cache": refused(
        "MLA on the grid keeps only the latent KV cache sharded by position (auto or "
        "positions); the dim-sliced cache of up-projected K/V is not laid out for MLA",
        lambda v, c: v == "dims", "dims"),
}

_DYNAMIC = f"read only by the dynamic inference context, which the grid refuses ({DYNAMIC_REFUSED})"
# StaticInferenceContext's constructor parameters and the fields of its InferenceConfig (the
# static context builds its own: InferenceConfig(materialize_only_last_token_logits=True)).
INFERENCE_OPTIONS: Dict[str, Option] = {
    "max_batch_size": supp(DECODE),
    "max_sequence_length": supp(DECODE),
    "use_flashinfer_fused_rope": orth("ignored by the static context; " + _DYNAMIC),
    "materialize_only_last_token_logits": orth("which logits the model returns"),
    **{name: orth(_DYNAMIC) for name in (
        "block_size_tokens", "buffer_size_gb", "paused_buffer_size_gb",
        "mamba_inference_state_config", "mamba_memory_ratio", "max_requests", "max_tokens",
        "unified_memory_level", "kv_cache_management_mode", "num_cuda_graphs",
        "cuda_graph_mixed_prefill_count", "cuda_graph_sizing_distribution",
        "use_cuda_graphs_for_non_decode_steps", "cuda_graph_all_prefills",
        "cuda_graph_max_tokens", "static_kv_memory_pointers", "pg_collection",
        "enable_chunked_prefill", "num_speculative_tokens", "enable_prefix_caching",
        "prefix_caching_eviction_policy", "prefix_caching_coordinator_policy",
        "prefix_caching_routing_alpha", "prefix_caching_mamba_gb",
        "track_paused_request_events", "track_generated_token_events", "metrics_writer",
        "logging_step_interval", "sampling_backend", "offset_sampling_seed_by_dp_rank",
        "async_sched_mode", "logprobs_mode", "request_metadata_types",
        "use_synchronous_zmq_collectives", "disable_ep_consensus", "ep_consensus_interval")},
}

TABLES = {"transformer": TRANSFORMER_OPTIONS, "model": MODEL_OPTIONS,
          "inference": INFERENCE_OPTIONS, "mla": MLA_OPTIONS}


def _refuse(table: Dict[str, Option], values: Dict[str, Any], config, where: str) -> None:
    for name, option in table.items():
        if option.kind != REFUSED or name not in values:
            continue
        value = values[name]
        if option.when(value, config):
            raise MxnConfigError(where + option.message(name, value))


def check_config(config, layer_number: Optional[int] = None) -> None:
    """Raise MxnConfigError for the first refused option `config` (a TransformerConfig) sets.
    Reads only the config: call it on every rank before any collective."""
    values = {name: getattr(config, name) for name in TRANSFORMER_OPTIONS
              if hasattr(config, name)}
    where = f"layer {layer_number}: " if layer_number is not None else ""
    _refuse(TRANSFORMER_OPTIONS, values, config, where)


def check_mla_config(config, layer_number: Optional[int] = None) -> None:
    """check_config's MLA part: MLATransformerConfig's own refused options, and those options
    the grid computes for standard attention but not for MLA."""
    where = f"layer {layer_number}: " if layer_number is not None else ""
    for table in (MLA_OPTIONS, MLA_RESTRICTIONS):
        values = {name: getattr(config, name) for name in table if hasattr(config, name)}
        _refuse(table, values, config, where)


def check_model(config=None, **params) -> None:
    """Raise MxnConfigError for a refused GPTModel/HybridModel parameter (e.g.
    position_embedding_type='mrope'); `params` are constructor keywords."""
    _refuse(MODEL_OPTIONS, params, config, "")


def check_core_attention(core_attention) -> None:
    """The layer spec's core_attention must be the grid's: anything that replaces it after
    get_mxn_layer_spec (megatron.training's GPTModelBuilder does for --attention-backend local)
    would run megatron's DotProductAttention on d/m dims per head with a d/m softmax scale."""
    from megatron_mxn.attention.core import MxnDotProductAttention

    if not (isinstance(core_attention, type) and issubclass(core_attention,
                                                            MxnDotProductAttention)):
        name = getattr(core_attention, "__qualname__", repr(core_attention))
        raise MxnConfigError(
            f"the grid attention's core_attention is {name}, not the grid's "
            "MxnDotProductAttention: something replaced it after get_mxn_layer_spec (megatron."
            "training's --attention-backend local does); it would attend over d/m dims per head "
            "with the wrong softmax scale")


def is_stock_core(core, stock, own: Optional[type] = None) -> bool:
    """Whether a spec's core_attention is one of `stock` ({(module, qualname)}: the cores a
    replacement computes the same as) or a subclass of `own` (already the replacement)."""
    name = (getattr(core, "__module__", None), getattr(core, "__qualname__", None))
    return name in stock or (own is not None and isinstance(core, type) and
                             issubclass(core, own))


def unclassified(fields: Iterable, table: Optional[Dict[str, Option]] = None) -> List[str]:
    """The names among `fields` (names or dataclasses.Field objects) that `table` (default:
    all three tables) does not classify."""
    known = table if table is not None else {k for t in TABLES.values() for k in t}
    return [n for n in (getattr(f, "name", f) for f in fields) if n not in known]


def by_kind(table: Dict[str, Option] = TRANSFORMER_OPTIONS) -> Dict[str, List[str]]:
    """{kind: [names]}: the table's size per class."""
    out: Dict[str, List[str]] = {ORTHOGONAL: [], SUPPORTED: [], REFUSED: []}
    for name, option in table.items():
        out[option.kind].append(name)
    return out
