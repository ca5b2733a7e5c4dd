#!/usr/bin/env bash
# Apply megatron_mxn's patch to a Megatron-LM git checkout's pretrain_gpt.py.
#
#   patches/apply_megatron_lm.sh /path/to/Megatron-LM
#
# Made for Megatron-LM branch core_r0.19.0 (commit f8837c04ef6c, megatron-core 0.19.1; the
# megatron-core 0.19.2 wheel ships the same megatron.training). The patch adds the --mxn-*
# flags (replace/alongside TP) and swaps the layer spec and TransformerConfig for the grid's:
# 2 import lines and the extra_args_provider. megatron_mxn must be importable in the same
# environment: pip install -e <this repository>.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
patch_file="$here/megatron_lm_core_r0.19.0_pretrain_gpt.patch"
checkout="${1:?usage: $0 /path/to/Megatron-LM}"
info="$checkout/megatron/core/package_info.py"
[ -f "$checkout/pretrain_gpt.py" ] && [ -f "$info" ] || {
    echo "error: $checkout is not a Megatron-LM checkout (no pretrain_gpt.py / package_info.py)" >&2
    exit 1
}
version="$(python3 - "$info" <<'PY'
import re, sys
text = open(sys.argv[1]).read()
print(".".join(re.search(rf"^{k} = (\d+)", text, re.M).group(1) for k in ("MAJOR", "MINOR", "PATCH")))
PY
)"
echo "Megatron-LM checkout: megatron-core $version; patch made for core_r0.19.0 (0.19.x)"
case "$version" in
    0.19.*) ;;
    *) echo "warning: not a 0.19.x checkout; the patch may not apply" >&2 ;;
esac
if grep -q "with_mxn_args" "$checkout/pretrain_gpt.py"; then
    echo "already patched: $checkout/pretrain_gpt.py"
    exit 0
fi
if ! (cd "$checkout" && patch -p1 --dry-run --silent < "$patch_file" >/dev/null); then
    echo "error: the patch does not apply to $checkout/pretrain_gpt.py (local changes or another version)" >&2
    exit 1
fi
(cd "$checkout" && patch -p1 --silent < "$patch_file")
echo "patched $checkout/pretrain_gpt.py; make sure megatron_mxn is installed: pip install -e $(dirname "$here")"
