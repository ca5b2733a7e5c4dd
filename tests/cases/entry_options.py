"""The entry points' model-config functions on Megatron's parsed flags, in one process (no ranks
launched): `python -m tests.cases.entry_options '[["gpt", [flags...]], ...]'` prints one
`RESULT {json}` line per case: {"ok": true, "spec": ...} or {"refused": message}.

Run in its own process: it turns on CPU mode for megatron.training (global patches) and
parses flags as rank 0 of 4, as scripts/pretrain_*_mxn.py do before any collective."""

from __future__ import annotations

import json
import os
import sys


def main() -> None:
    import megatron_mxn.cpu

    megatron_mxn.cpu.enable(training=True)
    from megatron.training.arguments import parse_args, validate_args

    from megatron_mxn.grid.layout import MxnConfigError
    from megatron_mxn.megatron_lm import add_mxn_args, mxn_gpt_config_from_args
    from megatron_mxn.megatron_lm.hybrid_config import mxn_hybrid_config_from_args

    entries = {"gpt": mxn_gpt_config_from_args, "hybrid": mxn_hybrid_config_from_args}
    os.environ.update(WORLD_SIZE="4", RANK="0", LOCAL_RANK="0")
    for entry, flags in json.loads(sys.argv[1]):
        sys.argv = ["pretrain", *flags]
        args = parse_args(add_mxn_args)
        rope_fusion = args.apply_rope_fusion  # before CPU mode's validate_args turns it off
        validate_args(args, {"tokenizer_type": "GPT2BPETokenizer"})
        try:
            cfg = entries[entry](args)
            result = {"ok": True, "spec": type(getattr(cfg, "transformer_layer_spec",
                                                        None)).__name__,
                      "rope_fusion_after_parsing": rope_fusion}
            if getattr(args, "multi_latent_attention", False):
                result.update(_mla(cfg))
        except MxnConfigError as err:
            result = {"refused": str(err)}
        print("RESULT " + json.dumps(result), flush=True)


MLA_FIELDS = ("q_lora_rank", "kv_lora_rank", "qk_head_dim", "qk_pos_emb_head_dim", "v_head_dim",
              "rope_type", "rotary_scaling_factor", "original_max_position_embeddings",
              "beta_fast", "beta_slow", "mscale", "mscale_all_dim")


def _mla(cfg) -> dict:
    """The MLA config's class and fields, and the [self-attention, core] class names of each
    layer of the spec the model config's callable makes (pure without MoE; megatron's MoE block
    spec needs the pipeline groups: not built here)."""
    from megatron.core.transformer.spec_utils import import_module

    config = cfg.transformer
    out = {"config": type(config).__name__,
           "mla": {name: getattr(config, name) for name in MLA_FIELDS}}
    if config.num_moe_experts:
        return out
    spec = cfg.transformer_layer_spec(cfg)
    layers = getattr(getattr(spec, "submodules", spec), "layer_specs", None) or [spec]
    attention = []
    for layer in layers:
        attn = layer.submodules.self_attention
        module = import_module(attn.module) if isinstance(attn.module, tuple) else attn.module
        attention += [module.__name__, attn.submodules.core_attention.__name__]
    return {**out, "attention": attention}


if __name__ == "__main__":
    main()
