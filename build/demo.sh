#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-2.0
#
# make demo: boot the built kernel in QEMU and show one live update.
set -uo pipefail
. "$(dirname "$0")/common.sh"

DEMO=memfd_demo
runner=$KLU_TOP/tools/testing/selftests/kvm_luo/run_vmtests.sh

echo "Booting the kernel in QEMU (TCG); stage 1 preserves, init kexecs, stage 2 retrieves."
"$runner" -s "$KLU_SRC" -b "$KLU_OBJ" -o "$KLU_OUT" -t "$DEMO" > "$KLU_CACHE/demo-runner.log"
status=$?
log=$KLU_OUT/logs/$DEMO.log

echo
sed -E 's/^\[ *[0-9]+\.[0-9]+\] //' "$log" 2>/dev/null | tr -d '\r' | awk '
	/^demo: / { sub(/^demo: /, "  "); print; next }
	/^KLU: stage 2 of .*starting/ { print "  --- kexec: the new kernel is up ---" }
'
echo
if [ "$status" = 0 ]; then
	echo "The data survived the live update. Serial log: $log"
else
	cat "$KLU_CACHE/demo-runner.log"
	echo "The demo FAILED. Serial log: $log"
fi
exit "$status"
