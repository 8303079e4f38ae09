#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-2.0
#
# make demo: boot the built kernel in QEMU and show one live update.
set -uo pipefail
. "$(dirname "$0")/common.sh"

if [ -n "${FLEET:-}" ] && [ "${FLEET:-}" != 0 ]; then
	DEMO=agent_fleet
fi
DEMO=${DEMO:-vmm_linux_guest}
runner=$KLU_TOP/tools/testing/selftests/kvm_luo/run_vmtests.sh
# The blackout is compared with a bare kexec: all of QEMU's memory is
# allocated first, as make bench does (build/bench.sh says why).
export KLU_QEMU_PREALLOC=${KLU_QEMU_PREALLOC:-1}

if [ "$DEMO" = agent_fleet ]; then
	cat <<'END'
A live update of a KVM host with two VMs, inside QEMU (TCG, nested SVM): the
agent tools/kvm_luo_agent holds /dev/liveupdate and hands each of two Rust
VMMs (tools/kvm_luo_vmm, Linux guests of 128 and 160 MiB) a LUO session
of its own. Once every guest runs, the operator's update makes every VMM stop
its guest and preserve it in its session; when all are ready the agent kexecs.
In the new kernel the agent hands each restarted VMM its session back, and
every guest goes on.
END
else
cat <<'END'
A live update of a KVM host, inside QEMU (TCG, nested SVM): the Rust VMM
tools/kvm_luo_vmm boots a Linux guest whose RAM is in guest_memfds, lets it
work, stops it, saves its state, preserves the VM, the guest_memfds and the
state in a LUO session; the host kernel kexecs into a new kernel, and the VMM
resumes the guest there. Then a bare kexec of the same kernel, to compare.
(DEMO=vmm_demo shows the quick real-mode guest instead, FLEET=1 two VMs
under the live-update agent.)
END
fi
# The demos with Linux guests run on one CPU, as make check runs them (see
# nested.list).
lists=$KLU_TOP/tools/testing/selftests/kvm_luo
list=(-l "$lists/tests.list")
awk -v d="$DEMO" '$1 == d { f = 1 } END { exit !f }' "$lists/nested.list" &&
	list=(-l "$lists/nested.list" -c 1)
"$runner" -s "$KLU_SRC" -b "$KLU_OBJ" -o "$KLU_OUT" -g "$KLU_CACHE/build-guest" "${list[@]}" -t "$DEMO" \
	> "$KLU_CACHE/demo-runner.log"
status=$?
log=$KLU_OUT/logs/$DEMO.log

echo
sed -E -e 's/^\[ *[0-9]+\.[0-9]+\] //' \
	-e 's/^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9:.]+Z (ERROR|WARN|INFO|DEBUG|TRACE) +//' "$log" 2>/dev/null | tr -d '\r' | awk '
	/^vmm: / { sub(/^vmm: /, "  "); print; next }
	/^vmm vm[0-9]+: / { sub(/^vmm /, "  ["); sub(/: /, "] "); print; next }
	/^(agent|fleet): / { print "  " $0; next }
	/^guest: GUEST: / { sub(/^guest: GUEST: /, "  [guest] "); print; next }
	/^guest vm[0-9]+: GUEST: / { sub(/^guest /, "  [guest "); sub(/: GUEST: /, "] "); print; next }
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
