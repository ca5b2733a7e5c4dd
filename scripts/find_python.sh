#!/usr/bin/env bash
# Print the path of a Python 3.12 interpreter: python3.12 on PATH, else a pyenv 3.12.x.
set -euo pipefail
if python3.12 -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
    command -v python3.12
    exit 0
fi
for root in "${PYENV_ROOT:-$HOME/.pyenv}" /usr/local /usr; do
    for py in "$root"/versions/3.12*/bin/python3.12 "$root"/bin/python3.12; do
        if [ -x "$py" ]; then echo "$py"; exit 0; fi
    done
done
echo "megatron_mxn needs Python 3.12: install it (e.g. 'pyenv install 3.12') or set PYTHON=..." >&2
exit 1
