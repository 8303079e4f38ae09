#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-2.0
#
# make bench: guest_memfd against memfd preservation, in one boot and one
# kexec (luo_bench), then the demo's Linux guest at 256 MiB and 2 GiB of RAM
# across a live update, each next to a bare kexec. Prints the table, saves it
# as JSON in $KLU_OUT/bench.json, and ends with one "ratios:" line.
set -uo pipefail
. "$(dirname "$0")/common.sh"

sel=$KLU_TOP/tools/testing/selftests/kvm_luo
runner=("$sel/run_vmtests.sh" -s "$KLU_SRC" -b "$KLU_OBJ" -o "$KLU_OUT"
	-g "$KLU_CACHE/build-guest" -l "$sel/bench.list")
# 16G: luo_bench holds about 11 GiB of files at once, and 1 GiB more while
# it fragments memory for fragmented-1G.
export KLU_QEMU_MEM=${KLU_QEMU_MEM:-16G}
"${runner[@]}" -t luo_bench
status=$?
"${runner[@]}" -c 1 -t bench_guest_256M -t bench_guest_2G || status=1

log=$KLU_OUT/logs/luo_bench.log
sed -n 's/^BENCH: //p' "$log" | tr -d '\r'
json=$(sed -n 's/^BENCH-JSON: //p' "$log" | tr -d '\r')
ratios=$(sed -n 's/^BENCH-RATIOS: //p' "$log" | tr -d '\r')
if [ -z "$json" ] || [ -z "$ratios" ]; then
	echo "no benchmark results in $log" >&2
	exit 1
fi
echo "$json" > "$KLU_OUT/bench.json"
echo "saved $KLU_OUT/bench.json"

# "blackout B ms / bare kexec K ms = R", printed by the VMM's third stage.
blackout() {
	tr -d '\r' < "$KLU_OUT/logs/bench_guest_$1.log" 2>/dev/null |
		sed -n 's/.*vmm: blackout \([0-9]*\) ms \/ bare kexec \([0-9]*\) ms = \([0-9.]*\)$/\1 \2 \3/p' |
		tail -n 1
}
for g in 256M 2G; do
	set -- $(blackout $g)
	if [ $# -eq 3 ]; then
		echo "guest $g: blackout $1 ms, bare kexec $2 ms, ratio $3"
	else
		echo "guest $g: no blackout measured (log $KLU_OUT/logs/bench_guest_$g.log)"
		status=1
	fi
done
set -- $(blackout 2G)
echo "ratios: $ratios blackout_vs_bare_kexec_2G=${3:-none}"
exit "$status"
