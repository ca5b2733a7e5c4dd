"""Batched greedy generation from a Megatron checkpoint under a grid or TP x PP layout:
`torchrun ... scripts/generate_mxn.py --load CKPT [Megatron flags] [--mxn-* flags]`.

Thin launcher around megatron_mxn.inference.generate (see there, or --help for the generation flags).
"""

import os
import sys

if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from megatron_mxn.inference.generate import main

    main()
