#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-2.0
#
# make bench: guest_memfd against memfd preservation, in one boot and one
# kexec (luo_bench), then the demo's Linux guest at 256 MiB, 2 GiB and 4 GiB
# of RAM across nine live updates each, every one followed by a bare kexec of
# the same kernel from the same image. Prints the tables (medians, with their
# spread, and each kexec in phases), saves luo_bench's as JSON in
# $KLU_OUT/bench.json, and ends with one "ratios:" line.
set -uo pipefail
. "$(dirname "$0")/common.sh"

sel=$KLU_TOP/tools/testing/selftests/kvm_luo
runner=("$sel/run_vmtests.sh" -s "$KLU_SRC" -b "$KLU_OBJ" -o "$KLU_OUT"
	-g "$KLU_CACHE/build-guest" -l "$sel/bench.list")
# 16G: luo_bench holds about 11 GiB of files at once, and 1 GiB more while
# it fragments memory for fragmented-1G.
export KLU_QEMU_MEM=${KLU_QEMU_MEM:-16G}
# All of it allocated before the machine starts: this host allocates a
# machine's memory on its first touch, and memory that no kernel touched
# before made a kexec slower for the kernel that first did (measured
# 2026-12-06: with KHO, memmap_init() 300-600 ms longer in 3 of 5 updates
# of the 4 GiB guest, the jump to the new kernel 60-160 ms longer; with
# all of it allocated, the jump as in the bare kexecs, and memmap_init()
# 0.5-1 s longer in 3 of 17 updates, a cause not found yet).
export KLU_QEMU_PREALLOC=${KLU_QEMU_PREALLOC:-1}
"${runner[@]}" -t luo_bench
status=$?
guests=(256M 2G 4G)
only=() logs=()
for g in "${guests[@]}"; do
	only+=(-t "bench_guest_$g")
	logs+=("$g=$KLU_OUT/logs/bench_guest_$g.log")
done
"${runner[@]}" -c 1 "${only[@]}" || status=1

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

# The guests' blackouts next to the bare kexecs, and the kexecs in phases.
guest_out=$(python3 "$sel/boot_phases.py" --bench "${logs[@]}") || status=1
grep -v '^BENCH-RATIOS: ' <<< "$guest_out"
echo "ratios: $ratios $(sed -n 's/^BENCH-RATIOS: //p' <<< "$guest_out")"
exit "$status"
