#!/usr/bin/env bash
# tools/sanitize.sh TOOL KERNEL_SUBSTRING CMD...: compute-sanitizer TOOL on CMD,
# instrumenting only kernels whose name contains KERNEL_SUBSTRING (XLA's own
# kernels then run uninstrumented). Exit 3 on any sanitizer error.
set -u
tool=$1 kernel=$2; shift 2
if compute-sanitizer --help 2>&1 | grep -q -- '--kernel-name'; then
  filter=(--kernel-name "kns=$kernel")
else
  filter=(--filter "kns=$kernel")  # older releases
fi
exec compute-sanitizer --tool "$tool" --error-exitcode 3 "${filter[@]}" "$@"
