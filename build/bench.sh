#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-2.0
#
# make bench: guest_memfd against memfd preservation, in one boot and one
# kexec. Prints the table and saves it as JSON in $KLU_OUT/bench.json.
set -uo pipefail
. "$(dirname "$0")/common.sh"

sel=$KLU_TOP/tools/testing/selftests/kvm_luo
KLU_QEMU_MEM=${KLU_QEMU_MEM:-6G} "$sel/run_vmtests.sh" -s "$KLU_SRC" -b "$KLU_OBJ" \
	-o "$KLU_OUT" -l "$sel/bench.list" -t luo_bench
status=$?
log=$KLU_OUT/logs/luo_bench.log
sed -n 's/^BENCH: //p' "$log" | tr -d '\r'
json=$(sed -n 's/^BENCH-JSON: //p' "$log" | tr -d '\r')
if [ -z "$json" ]; then
	echo "no benchmark results in $log" >&2
	exit 1
fi
echo "$json" > "$KLU_OUT/bench.json"
echo "saved $KLU_OUT/bench.json"
exit "$status"
