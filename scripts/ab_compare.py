"""The A/B of layouts on one checkpoint: `python scripts/ab_compare.py --config configs/cpu_dense.yaml`.

Thin launcher around megatron_mxn.tools.ab_compare (see there, or --help).
"""

import os
import sys

if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from megatron_mxn.tools.ab_compare import main

    sys.exit(main())
