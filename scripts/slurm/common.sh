# Shared set-up of the SLURM launchers (sourced by scripts/slurm/*.sbatch, which set -euo pipefail).
#
# Environment read here (all optional):
#   REPO             the megatron_mxn checkout (default: the directory sbatch was called from)
#   VENV             a virtual environment to activate on every node
#   PYTHON           the interpreter (default: python3 of the active environment)
#   MXN_CPU=1        CPU/gloo mode: no GPUs, NPROC_PER_NODE ranks per node (default 4)
#   GPUS_PER_NODE    ranks per node on GPUs (default: the job's --gpus-per-node, 8)
#   NPROC_PER_NODE   ranks per node (default: GPUS_PER_NODE, or 4 with MXN_CPU=1)
#   MASTER_ADDR      rendezvous host (default: the job's first node)
#   MASTER_PORT      rendezvous port (default: 20000 + job id mod 10000: jobs sharing a node differ,
#                    and it stays below the ephemeral ports that outgoing connections take)
#   OMP_NUM_THREADS  threads per rank (default: the node's cores / ranks, at least 1)
#   DRY_RUN=1        print the set-up and the command, run nothing
#   NCCL_DEBUG       default WARN
#   NCCL_SOCKET_IFNAME, NCCL_IB_HCA, NCCL_IB_DISABLE, GLOO_SOCKET_IFNAME, ...: passed on as set

mxn_log() { echo "[mxn-slurm] $*"; }
mxn_die() { echo "[mxn-slurm] error: $*" >&2; exit 1; }

# Print a command in a form that can be pasted back into a shell (quoting only where needed).
mxn_show() {
    local plain='^[A-Za-z0-9_./:=,@%+-]+$' line="" word
    for word in "$@"; do
        if [[ $word =~ $plain ]]; then line+=" $word"; else line+=" $(printf '%q' "$word")"; fi
    done
    echo "[mxn-slurm] +$line"
}

mxn_setup() {
    [ -n "${SLURM_JOB_ID:-}" ] || mxn_die "run this script with sbatch (SLURM_JOB_ID is not set)"
    REPO=${REPO:-${SLURM_SUBMIT_DIR:-$PWD}}
    [ -f "$REPO/scripts/pretrain_gpt_mxn.py" ] \
        || mxn_die "REPO=$REPO is not a megatron_mxn checkout (submit from it or set REPO)"
    cd "$REPO" || mxn_die "cannot cd to $REPO"

    if [ -n "${VENV:-}" ]; then
        [ -f "$VENV/bin/activate" ] || mxn_die "VENV=$VENV has no bin/activate"
        # activate reads unset variables; it is not ours to fix.
        set +u
        # shellcheck source=/dev/null
        source "$VENV/bin/activate"
        set -u
    fi
    PYTHON=${PYTHON:-python3}
    command -v "$PYTHON" >/dev/null || mxn_die "no $PYTHON on PATH (set VENV or PYTHON)"
    # The checkout first, so that an installed megatron_mxn cannot shadow it.
    export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

    if [ "${MXN_CPU:-0}" = 1 ]; then
        # CPU/gloo: hide any GPU so that the entry points turn CPU mode on themselves.
        export CUDA_VISIBLE_DEVICES=""
        NPROC_PER_NODE=${NPROC_PER_NODE:-4}
    else
        # What the job asked for (`sbatch --gpus-per-node=[type:]N`), unless said otherwise.
        local asked=${SLURM_GPUS_PER_NODE:-8}
        GPUS_PER_NODE=${GPUS_PER_NODE:-${asked##*:}}
        NPROC_PER_NODE=${NPROC_PER_NODE:-$GPUS_PER_NODE}
    fi
    [[ $NPROC_PER_NODE =~ ^[1-9][0-9]*$ ]] \
        || mxn_die "ranks per node must be a number > 0, not '$NPROC_PER_NODE' (set NPROC_PER_NODE)"
    NNODES=${SLURM_NNODES:-1}

    # torchrun's c10d rendezvous runs on the first node; every node's agent connects to it.
    MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)}
    MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 10000))}
    export MASTER_ADDR MASTER_PORT

    # Megatron's TP/sequence-parallel communication overlap relies on kernels reaching the GPU
    # in launch order, i.e. one hardware queue (it checks for this setting).
    export CUDA_DEVICE_MAX_CONNECTIONS=1
    export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
    # Share the node's cores among its ranks (torchrun would set 1 thread per rank otherwise).
    local threads=$(( $(nproc) / NPROC_PER_NODE ))
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( threads > 0 ? threads : 1 ))}

    mxn_log "job $SLURM_JOB_ID: $NNODES node(s) [$SLURM_JOB_NODELIST] x $NPROC_PER_NODE ranks," \
        "$( [ "${MXN_CPU:-0}" = 1 ] && echo "CPU/gloo" || echo "GPU/nccl" )," \
        "rendezvous $MASTER_ADDR:$MASTER_PORT, repo $REPO, python $(command -v "$PYTHON")"
    mxn_log "environment:" \
        "$(env | grep -E '^(CUDA_|NCCL_|GLOO_|OMP_NUM_THREADS=)' | sort | tr '\n' ' ')"
}

# mxn_run CMD...: print the command, then run it (unless DRY_RUN=1).
mxn_run() {
    mxn_show "$@"
    [ "${DRY_RUN:-0}" = 1 ] || "$@"
}

# mxn_check_layouts CONFIG LAYOUTS: each named layout's dim-slice groups (m adjacent ranks: the
# per-token score all-reduce) must lie inside one node, i.e. NPROC_PER_NODE is a multiple of its
# mxn-dim-slices. Head groups and TP may span nodes (the 16-GPU grid 4x4 does).
mxn_check_layouts() {
    "$PYTHON" - "$1" "$2" "$NPROC_PER_NODE" "$NNODES" <<'EOF'
import sys, yaml
path, names, per_node, nnodes = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
with open(path) as f:
    cfg = yaml.safe_load(f) or {}
layouts = cfg.get("layouts") or {}
bad = []
for name in filter(None, names.split(",")):
    if name not in layouts:
        sys.exit(f"[mxn-slurm] error: {path}: no layout '{name}' "
                 f"(layouts: {', '.join(sorted(layouts))})")
    flags = {str(k).replace("_", "-"): v for k, v in (layouts[name] or {}).items()}
    m = int(flags.get("mxn-dim-slices") or 1)
    if per_node % m:
        bad.append(f"layout '{name}' has mxn-dim-slices={m}, which does not divide the "
                   f"{per_node} ranks per node: its groups of {m} adjacent ranks would not all "
                   f"stay inside one node")
gpus = (cfg.get("cluster") or {}).get("gpus")
if gpus and int(gpus) != per_node * nnodes:
    print(f"[mxn-slurm] warning: {path} is sized for {gpus} ranks; "
          f"this job has {per_node * nnodes}")
if bad:
    sys.exit(f"[mxn-slurm] error: {path}: " + "; ".join(bad)
             + " (set GPUS_PER_NODE or NPROC_PER_NODE to a multiple)")
EOF
}

# Split EXTRA_ARGS on whitespace into the array EXTRA (no glob expansion).
# shellcheck disable=SC2034  # EXTRA is used by the sbatch scripts
mxn_extra_args() {
    EXTRA=()
    [ -z "${EXTRA_ARGS:-}" ] || read -r -a EXTRA <<< "$EXTRA_ARGS"
}
