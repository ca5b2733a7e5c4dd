"""scripts/pretrain_gpt_mxn.py with one test-only fault: a rank that SIGKILLs itself.

`--kill-rank R --kill-at log:N` kills rank R right after iteration N's training log (between
two checkpoints); `--kill-at save:N` kills it inside iteration N's checkpoint save, after the
shard files and `.metadata` are written and before metadata.json and the tracker file (only
rank 0 writes those, so R must be 0). torchrun then tears down the other ranks. Nothing is
mocked: the kill is a real SIGKILL of a real rank of Megatron's own training loop.
"""

import os
import signal
import sys


def _pop(flag: str) -> str:
    i = sys.argv.index(flag)
    value = sys.argv[i + 1]
    del sys.argv[i:i + 2]
    return value


def _die(where: str) -> None:
    print(f"[test] rank {os.environ['RANK']}: SIGKILL {where}", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


def install_fault(rank: int, point: str, iteration: int) -> None:
    if int(os.environ["RANK"]) != rank:
        return
    if point == "log":
        from megatron.training import training

        original = training.training_log

        def training_log(*args, **kwargs):
            result = original(*args, **kwargs)
            if args[3] == iteration:  # training_log(loss_dict, total, lr, iteration, ...)
                _die(f"after iteration {iteration}")
            return result

        training.training_log = training_log
    elif point == "save":
        from megatron.core.dist_checkpointing import serialization

        original_save_config = serialization.save_config

        def save_config(config, checkpoint_dir):
            if str(checkpoint_dir).endswith(f"iter_{iteration:07d}"):
                _die(f"while saving {checkpoint_dir}, before metadata.json")
            return original_save_config(config, checkpoint_dir)

        serialization.save_config = save_config
    else:
        raise ValueError(f"--kill-at takes log:N or save:N, got {point}")


if __name__ == "__main__":  # Megatron's checkpoint writer processes re-import this file
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    kill_rank = int(_pop("--kill-rank"))
    kill_point, kill_iteration = _pop("--kill-at").split(":")
    from megatron_mxn.megatron_lm.entry import install
    from megatron_mxn.megatron_lm.pretrain_gpt import main

    install()  # CPU mode first, then Megatron
    install_fault(kill_rank, kill_point, int(kill_iteration))
    main()
