"""A throw-away single-node SLURM cluster on localhost, for tests that submit the sbatch scripts.

`start_cluster(root)` installs SLURM when it is missing (root + apt-get: Debian's slurm-wlm),
writes a slurm.conf under `root` (state, spool, logs and pid files too; nothing in /etc is
used), starts slurmctld and slurmd in the foreground as child processes and waits until the
node is idle. Every slurm command must see `SLURM_CONF`: use `cluster.env` or `cluster.run`.
It raises ClusterUnavailable, with the reason, when SLURM cannot be had here (the caller skips).

Authentication is auth/none when this SLURM still ships that plugin (Debian 12's 22.05 does;
no daemon needed), else munge with a private key and socket under `root` (MXN_SLURM_AUTH=munge
forces that). The node claims at least 4 CPUs whatever the machine has
(SlurmdParameters=config_overrides), since the CPU jobs start 4 ranks per node; no cgroups,
no accounting database: job states come from `scontrol show job`, kept 10 min after the end.
"""

from __future__ import annotations

import glob
import os
import pwd
import random
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Dict, List

COMMANDS = ("sbatch", "scontrol", "sinfo", "squeue", "scancel", "srun", "slurmctld", "slurmd")
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
            "PREEMPTED", "BOOT_FAIL", "DEADLINE"}
NODE = "localhost"
MIN_CPUS = 4


class ClusterUnavailable(Exception):
    """SLURM cannot be installed or run on this machine; the message says why."""


def ensure_slurm_installed(timeout: int = 900) -> None:
    missing = [c for c in COMMANDS if shutil.which(c) is None]
    if not missing:
        return
    if os.environ.get("MXN_SLURM_INSTALL", "1") == "0":
        raise ClusterUnavailable(f"SLURM is not installed ({', '.join(missing)} missing) and "
                                 "MXN_SLURM_INSTALL=0 forbids installing it")
    if os.geteuid() != 0:
        raise ClusterUnavailable(f"SLURM is not installed ({', '.join(missing)} missing) and "
                                 "installing it needs root")
    if shutil.which("apt-get") is None:
        raise ClusterUnavailable("SLURM is not installed and there is no apt-get to install it")
    install = ["apt-get", "install", "-y", "--no-install-recommends", "slurm-wlm"]
    if _apt(install, timeout).returncode != 0:
        # The package lists may be stale or absent (fresh containers): update once, retry.
        update = _apt(["apt-get", "update"], timeout)
        if update.returncode != 0:
            raise ClusterUnavailable("apt-get update failed (no network?):\n"
                                     + update.stderr[-2000:])
        proc = _apt(install, timeout)
        if proc.returncode != 0:
            raise ClusterUnavailable("apt-get install slurm-wlm failed:\n" + proc.stderr[-2000:])
    missing = [c for c in COMMANDS if shutil.which(c) is None]
    if missing:
        raise ClusterUnavailable(f"slurm-wlm installed, but {', '.join(missing)} still missing")


def _apt(cmd: List[str], timeout: int) -> subprocess.CompletedProcess:
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    try:
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise ClusterUnavailable(f"'{' '.join(cmd)}' took more than {timeout} s") from None


def free_port() -> int:
    """A free TCP port below Linux's ephemeral range (32768+): a port that bind(0) hands out can
    be taken by someone's outgoing connection before the job listens on it."""
    for _ in range(100):
        port = random.randrange(20000, 30000)
        with socket.socket() as s:
            try:
                s.bind(("", port))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port in 20000-29999")


def _has_plugin(name: str) -> bool:
    """Whether SLURM's plugin directory (Debian, RPM or source-install layout) has `name`.so."""
    patterns = ["/usr/lib/*/slurm-wlm", "/usr/lib/*/slurm", "/usr/lib/slurm", "/usr/lib64/slurm",
                "/usr/local/lib/slurm", "/usr/local/lib64/slurm"]
    return any(os.path.exists(os.path.join(d, name + ".so"))
               for pattern in patterns for d in glob.glob(pattern))


def _memory_mb() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    return 4096


class SlurmCluster:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.conf = self.root / "slurm.conf"
        self.env: Dict[str, str] = dict(os.environ, SLURM_CONF=str(self.conf))
        self.procs: Dict[str, subprocess.Popen] = {}
        self.logs = {name: self.root / "log" / f"{name}.log" for name in ("slurmctld", "slurmd")}

    # --- set-up -----------------------------------------------------------------------------
    def _auth_lines(self) -> List[str]:
        choice = os.environ.get("MXN_SLURM_AUTH") or (
            "none" if _has_plugin("auth_none") and _has_plugin("cred_none") else "munge")
        if choice == "none":
            return ["AuthType=auth/none", "CredType=cred/none"]
        munged = shutil.which("munged") or "/usr/sbin/munged"
        if not os.path.exists(munged):
            raise ClusterUnavailable("this SLURM has no auth/none plugin and munged is missing")
        key, sock = self.root / "munge" / "munge.key", self.root / "munge" / "munge.sock"
        key.parent.mkdir(mode=0o700)
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        # --force: munged refuses root and group-writable paths otherwise; this key is private.
        self._spawn("munged", [munged, "--foreground", "--force", f"--socket={sock}",
                               f"--key-file={key}", f"--pid-file={key.parent / 'munged.pid'}",
                               f"--seed-file={key.parent / 'munged.seed'}"])
        self._wait(lambda: sock.exists(), 20, "munged to open its socket")
        return ["AuthType=auth/munge", "CredType=cred/munge", f"AuthInfo=socket={sock}"]

    def write_conf(self, auth: List[str]) -> None:
        r = self.root
        for sub in ("state", "spool", "log"):
            (r / sub).mkdir(exist_ok=True)
        user = pwd.getpwuid(os.geteuid()).pw_name
        cpus = max(MIN_CPUS, os.cpu_count() or 1)
        lines = [
            "ClusterName=mxntest",
            f"SlurmctldHost={NODE}",
            # Private ports, so that a real cluster or a second test run on this host is no clash.
            f"SlurmctldPort={free_port()}",
            f"SlurmdPort={free_port()}",
            f"SlurmUser={user}",
            f"SlurmdUser={user}",
            *auth,
            "ProctrackType=proctrack/linuxproc",  # no cgroups: containers rarely delegate them
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",  # no memory bookkeeping
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "MpiDefault=none",
            "SwitchType=switch/none",
            "ReturnToService=2",
            "MailProg=/bin/true",
            "MinJobAge=600",  # finished jobs stay in `scontrol show job` (no sacct, no slurmdbd)
            "SlurmdParameters=config_overrides",  # trust the CPUs below, not the hardware
            "SlurmdTimeout=300",
            f"StateSaveLocation={r / 'state'}",
            f"SlurmdSpoolDir={r / 'spool'}",
            f"SlurmctldPidFile={r / 'slurmctld.pid'}",
            f"SlurmdPidFile={r / 'slurmd.pid'}",
            f"SlurmctldLogFile={self.logs['slurmctld']}",
            f"SlurmdLogFile={self.logs['slurmd']}",
            f"NodeName={NODE} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={_memory_mb()}",
            f"PartitionName=test Nodes={NODE} Default=YES MaxTime=INFINITE State=UP",
        ]
        self.conf.write_text("\n".join(lines) + "\n")

    def _spawn(self, name: str, cmd: List[str]) -> None:
        out = open(self.root / "log" / f"{name}.stdout", "w")
        self.procs[name] = subprocess.Popen(cmd, env=self.env, stdout=out,
                                            stderr=subprocess.STDOUT, start_new_session=True)
        out.close()

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            dead = [n for n, p in self.procs.items() if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                why = f"{', '.join(dead)} exited" if dead else "timed out"
                raise RuntimeError(f"{why} waiting for {what}" + self.log_tails())
            time.sleep(0.5)

    def start(self) -> "SlurmCluster":
        (self.root / "log").mkdir(parents=True, exist_ok=True)
        self.write_conf(self._auth_lines())
        # -D: stay in the foreground, so these Popen objects are the daemons; -i: no old state.
        self._spawn("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)])
        self._spawn("slurmd", ["slurmd", "-D", "-f", str(self.conf), "-N", NODE])
        self._wait(lambda: self.node_state() == "idle", 60, f"node {NODE} to be idle")
        return self

    # --- use --------------------------------------------------------------------------------
    def run(self, *cmd: str, **kw) -> subprocess.CompletedProcess:
        kw.setdefault("env", self.env)
        return subprocess.run(list(cmd), capture_output=True, text=True, timeout=60, **kw)

    def node_state(self) -> str:
        proc = self.run("sinfo", "-h", "-n", NODE, "-o", "%T")
        return proc.stdout.strip() if proc.returncode == 0 else ""

    def sbatch(self, script: str, args: List[str], env: Dict[str, str], cwd: Path) -> str:
        """Submit `script` with sbatch options `args`; `env` is added to the job's environment
        (sbatch passes its whole environment on). Returns the job id."""
        proc = self.run("sbatch", "--parsable", *args, script, env={**self.env, **env},
                        cwd=str(cwd))
        if proc.returncode != 0:
            raise RuntimeError(f"sbatch failed: {proc.stderr}")
        return proc.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> Dict[str, str]:
        """`scontrol show job` as a dict (JobState, ExitCode, StdOut, ...)."""
        proc = self.run("scontrol", "show", "job", "-o", job_id)
        fields = {}
        for item in proc.stdout.split():
            key, sep, value = item.partition("=")
            if sep:
                fields[key] = value
        return fields

    def wait(self, job_id: str, timeout: float) -> Dict[str, str]:
        """Poll until the job ends; on timeout cancel it and return its last state."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.job(job_id)
            if info.get("JobState") in TERMINAL:
                return info
            if time.monotonic() > deadline:
                self.run("scancel", job_id)
                was = info.get("JobState")
                info["JobState"] = f"cancelled by the test after {timeout:.0f} s (was {was})"
                return info
            time.sleep(2)

    def log_tails(self, chars: int = 3000) -> str:
        """The end of each daemon's log and console output."""
        return "".join(f"\n--- {path} (end) ---\n{path.read_text(errors='replace')[-chars:]}"
                       for path in sorted((self.root / "log").glob("*")) if path.stat().st_size)

    # --- tear-down ---------------------------------------------------------------------------
    def stop(self) -> None:
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            # Job steps (slurmstepd and the ranks) outlive slurmd by design: cancel them first.
            self.run("scancel", "--user", pwd.getpwuid(os.geteuid()).pw_name)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                proc = self.run("squeue", "-h", "-o", "%i")
                if proc.returncode != 0 or not proc.stdout.strip():
                    break
                time.sleep(1)
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def start_cluster(root: Path) -> SlurmCluster:
    """Install SLURM if needed and start a one-node cluster under `root` (ClusterUnavailable
    when that cannot be done here; RuntimeError when SLURM is there but will not start)."""
    ensure_slurm_installed()
    if os.geteuid() != 0:
        raise ClusterUnavailable("slurmd must run as root to start jobs; run the test as root")
    cluster = SlurmCluster(root)
    try:
        return cluster.start()
    except BaseException:
        cluster.stop()
        raise
