#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-2.0
#
# make series, make series-check: export the work as a patch series against
# the base (patches/export.plan says how) and check it. See build/series.py.
set -euo pipefail
. "$(dirname "$0")/common.sh"

"$KLU_TOP/build/kernel.sh" assemble
export KLU_TOP KLU_CACHE KLU_BASE KLU_SRC
KLU_DIRS="${KLU_KERNEL_DIRS[*]}"
export KLU_DIRS
if [ "${1:-export}" = check ]; then
	# It builds kernels: one at a time.
	exec 8>"$KLU_CACHE/.kernel.lock"
	flock 8
fi
exec python3 "$KLU_TOP/build/series.py" "${1:-export}"
