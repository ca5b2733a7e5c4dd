#!/usr/bin/env bash
# One-device check of the attention kernels: numerics, and one rank's share of the attention
# core under TP=8 and the grid's schedules (scripts/gpu_check.py says why). Tables go to --out.
#   scripts/gpu_check.sh [--device cuda|cpu] [--out DIR] [--quick]
# Python: $PYTHON, else the repository's .venv, else python3. Device: cuda if torch sees one.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
    PY="$ROOT/.venv/bin/python"
    [ -x "$PY" ] || PY="$(command -v python3 || echo python)"
fi
DEVICE=()
case " $* " in
    *" --device"*) ;;  # given: skip the probe (importing torch takes seconds)
    *) CUDA="$("$PY" -c 'import torch; print(torch.cuda.is_available())' 2>/dev/null)"
       if [ "$CUDA" = True ]; then DEVICE=(--device cuda); else DEVICE=(--device cpu); fi
       echo "gpu_check: ${DEVICE[1]}" ;;
esac
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
"$PY" "$ROOT/scripts/gpu_check.py" ${DEVICE[@]+"${DEVICE[@]}"} "$@"
rc=$?
if [ "$rc" -ne 0 ]; then
    echo "gpu_check: FAILED (exit $rc)" >&2
    exit "$rc"
fi
echo "gpu_check: passed"
