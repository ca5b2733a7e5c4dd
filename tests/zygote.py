"""Start the ranks of a multi-process job by forking one process that has already imported
torch and megatron, instead of starting `nproc` fresh interpreters under torchrun.

Every entry point's test launches a job of 2-8 ranks; on 2 cores most of a short job is each
rank importing torch and megatron (about 6 CPU-seconds a rank, plus torchrun's own agent). The
zygote does the entry points' own first step once (`megatron_lm.entry.install()`: CPU mode,
the grid's hooks) and imports megatron's training and generation modules, then forks the ranks
of each job from that image. A forked rank gets the environment torchrun would give it (RANK,
LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT, ...), its own working directory and log files, and
runs the script as `__main__` (runpy), so what it executes is what it executes under torchrun,
with the installs already done (they are idempotent). Like torchrun, the first rank to fail
gets the others terminated (unless the job asks for ranks that live apart).

The zygote stays single-threaded and never initializes torch.distributed or runs a tensor op,
so forking it is safe. It speaks one JSON line per request and per reply on stdin/stdout:

    request: {"script", "args", "nproc", "cwd", "logs", "env", "timeout", "apart"}
    reply:   {"codes": [exit code per rank], "timed_out": bool}

Tests that are about torchrun itself (a rank killed mid-run, the SLURM launcher) still use it.
"""

from __future__ import annotations

import json
import os
import runpy
import signal
import sys
import time
import traceback


def _warm() -> None:
    """What every entry point does first, and the modules they import after it."""
    import torch

    torch.set_num_threads(1)
    from megatron_mxn.megatron_lm.entry import install

    install()
    import megatron_mxn.inference.generate  # noqa: F401
    import megatron_mxn.megatron_lm.gpt_training  # noqa: F401
    import megatron.training.training  # noqa: F401


def _run_rank(request: dict, rank: int) -> int:
    """In the forked child: become rank `rank` and run the script; its exit code."""
    os.setpgrp()  # its own process group: the zygote can kill what the rank spawns
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_DFL)
    nproc = request["nproc"]
    os.environ.clear()
    os.environ.update(request["env"])
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc),
                      LOCAL_WORLD_SIZE=str(nproc), GROUP_RANK="0", ROLE_RANK=str(rank),
                      ROLE_WORLD_SIZE=str(nproc))
    os.chdir(request["cwd"])
    log_dir = os.path.join(request["logs"], "zygote", "attempt_0", str(rank))
    os.makedirs(log_dir, exist_ok=True)
    for fd, name in ((1, "stdout.log"), (2, "stderr.log")):
        out = os.open(os.path.join(log_dir, name), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(out, fd)
        os.close(out)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)  # (not the zygote's request pipe)
    os.close(null)
    sys.stdin = open(os.devnull)
    sys.stdout = os.fdopen(1, "w", buffering=1)
    sys.stderr = os.fdopen(2, "w", buffering=1)
    script, args = request["script"], request["args"]
    code = 0
    try:
        if script.startswith("-m "):
            module = script[3:].strip()
            sys.argv = [module, *args]
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        else:
            sys.argv = [script, *args]
            sys.path[0] = os.path.dirname(script)
            runpy.run_path(script, run_name="__main__")
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    except BaseException:  # noqa: BLE001  (the rank fails, as it would under torchrun)
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    return code


def _kill(pids) -> None:
    for pid in pids:
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _launch(request: dict) -> dict:
    """Fork the ranks, wait for them; torchrun's rule: the first failure ends the job."""
    pids = {}
    for rank in range(request["nproc"]):
        pid = os.fork()
        if pid == 0:
            os._exit(_run_rank(request, rank))
        pids[pid] = rank
    codes = [None] * request["nproc"]
    deadline = time.monotonic() + request["timeout"]
    failed_at = None
    while pids:
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid == 0:
            now = time.monotonic()
            if now > deadline:
                _kill(pids)
                for pid in list(pids):
                    os.waitpid(pid, 0)
                    codes[pids.pop(pid)] = -signal.SIGKILL
                return {"codes": codes, "timed_out": True}
            if failed_at is not None and now > failed_at + 5:
                _kill(pids)  # (torchrun: SIGTERM, then SIGKILL after a grace period)
            time.sleep(0.05)
            continue
        if pid not in pids:
            continue
        rank = pids.pop(pid)
        codes[rank] = os.waitstatus_to_exitcode(status)
        _kill([pid])  # helpers the rank left behind
        if codes[rank] != 0 and not request["apart"] and failed_at is None:
            failed_at = time.monotonic()
            for other in pids:
                try:
                    os.killpg(other, signal.SIGTERM)
                except ProcessLookupError:
                    pass
    return {"codes": codes, "timed_out": False}


def main() -> None:
    _warm()
    reply = sys.stdout
    sys.stdout = sys.stderr  # nothing but replies on the reply channel
    print(json.dumps({"ready": True}), file=reply, flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        print(json.dumps(_launch(json.loads(line))), file=reply, flush=True)


if __name__ == "__main__":
    main()
