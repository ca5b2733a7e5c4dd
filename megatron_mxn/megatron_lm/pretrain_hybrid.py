"""Pretrain megatron-core's HybridModel (`--hybrid-layer-pattern`, e.g. `*-*E`: attention `*`,
MLP `-`, MoE `E`, Mamba `M`) with Megatron's training loop and the grid attention.

The counterpart of Megatron-LM's hybrid (Mamba) pretraining script: the data, loss and loop are
pretrain_gpt's (the same batch and forward signature), only the model config differs. Launched
through scripts/pretrain_hybrid_mxn.py (torchrun).
"""

from megatron_mxn.megatron_lm.entry import install
from megatron_mxn.megatron_lm.pretrain_gpt import run


def main():
    install()  # CPU mode first, as for GPT
    from megatron_mxn.megatron_lm.hybrid_config import (  # (imports megatron.training)
        mxn_hybrid_config_from_args,
    )

    run(mxn_hybrid_config_from_args)


if __name__ == "__main__":
    main()
