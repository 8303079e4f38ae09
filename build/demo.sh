#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-2.0
#
# make demo: boot the built kernel in QEMU and show one live update.
set -uo pipefail
. "$(dirname "$0")/common.sh"

DEMO=${DEMO:-vmm_linux_guest}
runner=$KLU_TOP/tools/testing/selftests/kvm_luo/run_vmtests.sh

cat <<'END'
A live update of a KVM host, inside QEMU (TCG, nested SVM): the Rust VMM
tools/kvm_luo_vmm boots a Linux guest whose RAM is in guest_memfds, lets it
work, stops it, saves its state, preserves the VM, the guest_memfds and the
state in a LUO session; the host kernel kexecs into a new kernel, and the VMM
resumes the guest there. First, a bare kexec of the same kernel to compare.
(DEMO=vmm_demo shows the quick real-mode guest instead.)
END
"$runner" -s "$KLU_SRC" -b "$KLU_OBJ" -o "$KLU_OUT" -g "$KLU_CACHE/build-guest" -t "$DEMO" \
	> "$KLU_CACHE/demo-runner.log"
status=$?
log=$KLU_OUT/logs/$DEMO.log

echo
sed -E 's/^\[ *[0-9]+\.[0-9]+\] //' "$log" 2>/dev/null | tr -d '\r' | awk '
	/^vmm: / { sub(/^vmm: /, "  "); print; next }
	/^guest: GUEST: / { sub(/^guest: GUEST: /, "  [guest] "); print; next }
	/^KLU: stage [23] of .*starting/ { print "  --- kexec: the new kernel is up ---" }
'
echo
if [ "$status" = 0 ]; then
	echo "Serial log: $log"
else
	cat "$KLU_CACHE/demo-runner.log"
	echo "The demo FAILED. Serial log: $log"
fi
exit "$status"
