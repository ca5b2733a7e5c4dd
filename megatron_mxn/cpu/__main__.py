"""Run a Megatron training script on CPU: `torchrun ... -m megatron_mxn.cpu SCRIPT [ARGS...]`.

Enables CPU mode (with the megatron.training patches) in each rank, then runs SCRIPT as
__main__ with ARGS, e.g. a Megatron-LM checkout's patched pretrain_gpt.py with
`--distributed-backend gloo`. Put the checkout on PYTHONPATH so that its `megatron` package is
the one imported.
"""

import os
import runpy
import sys

import megatron_mxn.cpu


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    script = os.path.abspath(sys.argv[1])
    sys.argv = [script, *sys.argv[2:]]
    sys.path.insert(0, os.path.dirname(script))
    megatron_mxn.cpu.enable(training=True)
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
