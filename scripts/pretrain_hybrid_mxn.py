"""Megatron HybridModel pretraining (--hybrid-layer-pattern) with the head-group x dim-slice grid: `torchrun ... scripts/pretrain_hybrid_mxn.py [Megatron flags] [--mxn-* flags]`.

Thin launcher around megatron_mxn.megatron_lm.pretrain_hybrid: helper processes that Megatron spawns (its
checkpoint writer) re-import this file, so it imports nothing heavy at the top level.
"""

import os
import sys

if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from megatron_mxn.megatron_lm.pretrain_hybrid import main

    main()
