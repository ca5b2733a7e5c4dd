"""Pretrain a GPT with Megatron's training loop, with the head-group x dim-slice grid attention.

The counterpart of Megatron-LM's pretrain_gpt.py for the megatron-core wheel (which ships
Megatron-LM's `megatron.training`): same loop, data pipeline, checkpoints and logs, every
standard flag with its usual meaning, plus `--mxn-head-groups/--mxn-dim-slices/--mxn-attention`.
Launched through scripts/pretrain_gpt_mxn.py (torchrun, like pretrain_gpt.py). On a machine
without a GPU it runs on CPU with `--distributed-backend gloo` (megatron_mxn's CPU mode).

Importing this module installs nothing and imports no megatron: `run` installs CPU mode (or
the wheel fixes) and the grid's hooks first (entry.install), then imports the training pieces
(gpt_training.py).
"""

from megatron_mxn.megatron_lm.entry import install
from megatron_mxn.megatron_lm.model_config import mxn_gpt_config_from_args


def main():
    run(mxn_gpt_config_from_args)


def run(model_config_from_args):
    """Megatron's pretrain() on the model `model_config_from_args(args)` describes (see
    gpt_training.pretrain_model), after CPU mode or the wheel fixes and the grid's hooks."""
    install()
    from megatron_mxn.megatron_lm import gpt_training  # (imports megatron: after install())

    gpt_training.pretrain_model(model_config_from_args)


if __name__ == "__main__":
    main()
