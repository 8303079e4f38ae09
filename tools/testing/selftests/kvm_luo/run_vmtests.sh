#!/bin/bash
# SPDX-License-Identifier: GPL-2.0
#
# Run the kvm_luo tests in QEMU: one boot per test, two for the tests that
# kexec. Builds the test binaries statically, packs them with init.c into an
# initramfs, boots the kernel under TCG with -cpu max (so KVM works inside
# the guest), and reports every test as passed or failed with its duration.
# Ends with "N passed, N failed" and exits non-zero if anything failed.
# A machine still running at its test's timeout is asked what it does first
# (an NMI to its boot CPU: its kernel panics with every CPU's backtrace; then
# QEMU's view of its CPUs, in LOG.hang), and the test fails.
#
# Usage: run_vmtests.sh -s SRC -b BUILD -o OUT [-g GUEST] [-t TEST]... [-r RESULTS]
#                       [-l LIST[:CPUS]]... [-c CPUS] [-j JOBS] [-k BZIMAGE] [-q]
#   -s  the assembled kernel source tree
#   -b  its O= build directory (with bzImage, usr/include, usr/gen_init_cpio)
#   -g  the O= build directory of the Linux guest's kernel (the tests that
#       run a Linux guest fail without it)
#   -o  where binaries, the initramfs and the serial logs go
#   -t  run only this test (repeatable); default: every test of the lists
#   -r  also append "PASS|FAIL name seconds" lines to this file
#   -l  a test list (default: tests.list next to this script); repeatable,
#       and LIST:CPUS gives that list's machines CPUS CPUs instead of -c's
#   -c  CPUs of the QEMU machine (default 2); nested.list runs with 1 (see there)
#   -j  run up to JOBS QEMU machines at once (default 1). The tests start
#       longest timeout first, and every timeout is multiplied by
#       (JOBS + 1) / 2: the machines share this host's CPUs (see check.sh
#       for what two at once cost each test)
#   -k  boot this kernel instead of the one in -b (which still gives the
#       headers and gen_init_cpio): the soak's unpatched base
#   -q  also pack this machine's QEMU, with its libraries and firmware, in
#       /qemu of the initramfs: the soak's other inner VMM
# Environment:
#   KLU_QEMU_MEM     guest memory (default 3G, 4G for a debug kernel)
#   KLU_QEMU_PREALLOC  1: QEMU allocates all of the guest memory before the
#                    machine starts (-mem-prealloc), so that no kernel pays
#                    for this host's first touch of memory that an earlier
#                    kernel left untouched (make bench)
#   KLU_INJECT_FAIL  name of a test to run with a wrong expected exit status,
#                    to show that a failing test fails the run

set -u

here=$(cd "$(dirname "$0")" && pwd)
src="" obj="" out="" results="" guest="" cpus=2 kernel="" qemu=0 jobs=1
only=() lists=()

while getopts 's:b:o:g:t:r:l:c:j:k:qh' opt; do
	case $opt in
	s) src=$(realpath "$OPTARG") ;;
	b) obj=$(realpath "$OPTARG") ;;
	o) out=$(realpath -m "$OPTARG") ;;
	g) guest=$(realpath -m "$OPTARG") ;;
	t) only+=("$OPTARG") ;;
	r) results=$(realpath -m "$OPTARG") ;;
	l) lists+=("$OPTARG") ;;
	c) cpus=$OPTARG ;;
	j) jobs=$OPTARG ;;
	k) kernel=$(realpath "$OPTARG") ;;
	q) qemu=1 ;;
	*) sed -n '2,/^$/s/^# \{0,1\}//p' "$0"; exit 2 ;;
	esac
done
[ -n "$src" ] && [ -n "$obj" ] && [ -n "$out" ] || { echo "need -s, -b and -o" >&2; exit 2; }
[[ "$cpus" =~ ^[1-8]$ ]] || { echo "-c takes 1 to 8 CPUs" >&2; exit 2; }
[[ "$jobs" =~ ^[1-8]$ ]] || { echo "-j takes 1 to 8 jobs" >&2; exit 2; }

# Each list as "FILE CPUS", its CPUs from -l LIST:CPUS or -c; the first
# list's name (without .list) names the run's build and selection failures.
[ ${#lists[@]} -gt 0 ] || lists=("$here/tests.list")
list_cpus=()
for l in "${lists[@]}"; do
	c=$cpus
	if [[ "$l" =~ ^(.*):([1-8])$ ]]; then
		l=${BASH_REMATCH[1]} c=${BASH_REMATCH[2]}
	fi
	[ -f "$l" ] || { echo "no test list $l" >&2; exit 2; }
	list_cpus+=("$(realpath "$l") $c")
done
run_name=$(basename "${list_cpus[0]% *}" .list)
kernel=${kernel:-$obj/arch/x86/boot/bzImage}
hdrs=$obj/usr/include
gen_cpio=$obj/usr/gen_init_cpio
sel=$src/tools/testing/selftests
root=$out/root
logs=$out/logs
for f in "$kernel" "$gen_cpio" "$hdrs/linux/liveupdate.h"; do
	[ -e "$f" ] || { echo "missing $f: build the kernel first" >&2; exit 2; }
done

# Every result of this run, "PASS|FAIL name", written by the tests running
# in parallel and counted at the end.
tally=""
mon_root=""

# A debug kernel (KASAN, kmemleak): KASAN's shadow makes KHO's default scratch
# sizing fail at boot, so size it, and give QEMU room for it. Every stage of
# every test must then report a kmemleak scan with no leak. And 4-level paging
# (no5lvl): with 5-level paging (-cpu max has LA57), an interrupt that comes
# while identify_cpu() has cleared the boot CPU's feature bits makes KASAN
# take direct-map addresses for wild ones (pgtable_l5_enabled() reads
# X86_FEATURE_LA57); an upstream race, not ours, seen in about half the boots.
debug_kernel=0
grep -q '^CONFIG_DEBUG_KMEMLEAK=y' "$(dirname "$kernel")/../../../.config" 2>/dev/null &&
	debug_kernel=1
if [ "$debug_kernel" = 1 ]; then
	qemu_mem=${KLU_QEMU_MEM:-4G}
	debug_cmdline="kho_scratch=128M,768M,256M no5lvl log_buf_len=4M"
else
	qemu_mem=${KLU_QEMU_MEM:-3G}
	debug_cmdline=""
fi

record() {	# record PASS|FAIL name seconds [reason]
	local verdict=$1 name=$2 secs=$3 reason=${4:-}
	echo "$verdict $name" >> "$tally"
	[ -z "$results" ] || echo "$verdict $name $secs" >> "$results"
	if [ "$verdict" = PASS ]; then
		printf 'ok     %-34s %6ss\n' "$name" "$secs"
	else
		printf 'FAIL   %-34s %6ss  %s\n' "$name" "$secs" "$reason"
	fi
}

# --- build -----------------------------------------------------------------

build_liveupdate() {
	local t d=$sel/liveupdate
	mkdir -p "$root/liveupdate"
	for t in liveupdate luo_kexec_simple luo_multi_session luo_stress_files \
		 luo_stress_sessions; do
		gcc -static -O2 -Wall -Wno-unused-function -D_GNU_SOURCE= -isystem "$hdrs" \
			-I "$d/lib/include" -I "$sel" -o "$root/liveupdate/$t" \
			"$d/$t.c" "$d/lib/lu_utils.c" || return 1
	done
}

# The project's own userspace tests and demos.
build_kvm_luo() {
	local t
	mkdir -p "$root/kvm_luo"
	for t in memfd_demo kvm_vm_luo_test guest_memfd_luo_test \
		 guest_memfd_luo_abort_test late_write lazy_restore \
		 background_restore chain numa fragmented fault_inject luo_bench \
		 refused kvm_module; do
		gcc -static -O2 -Wall -D_GNU_SOURCE= -isystem "$hdrs" \
			-I "$sel/liveupdate/lib/include" -I "$sel" \
			-o "$root/kvm_luo/$t" "$here/$t.c" "$here/klu_util.c" \
			"$sel/liveupdate/lib/lu_utils.c" || return 1
	done
}

# The Rust VMM of the demo (tools/kvm_luo_vmm), the live-update agent with its
# client (tools/kvm_luo_agent) and its tests (fleet/), static: the workspace
# tools/Cargo.toml.
build_vmm() {
	local bin rel=$out/cargo/x86_64-unknown-linux-gnu/release
	RUSTFLAGS='-C target-feature=+crt-static' CARGO_TARGET_DIR="$out/cargo" \
		cargo build -q --locked --release --workspace --target x86_64-unknown-linux-gnu \
		--manifest-path "$src/tools/Cargo.toml" || return 1
	for bin in kvm-luo-vmm kvm-luo-agent kvm-luo-ctl kvm-luo-fleet; do
		cp "$rel/$bin" "$root/kvm_luo/" || return 1
	done
}

# The Linux guest of the VMM: its kernel and an initramfs with busybox, the
# guest's init and its work (tools/kvm_luo_vmm/guest).
build_guest() {
	local dir=$src/tools/kvm_luo_vmm/guest groot=$out/guest-root
	local bz=$guest/arch/x86/boot/bzImage
	[ -n "$guest" ] || return 0
	[ -f "$bz" ] || { echo "missing $bz: build the guest kernel first" >&2; return 1; }
	rm -rf "$groot" && mkdir -p "$groot" "$root/kvm_luo/guest" || return 1
	gcc -static -O2 -Wall -pthread -o "$groot/work" "$dir/work.c" || return 1
	{
		echo "dir /dev 0755 0 0"
		echo "nod /dev/console 0600 0 0 c 5 1"
		echo "nod /dev/null 0666 0 0 c 1 3"
		echo "dir /proc 0755 0 0"
		echo "dir /sys 0755 0 0"
		echo "dir /bin 0755 0 0"
		echo "file /bin/busybox /bin/busybox 0755 0 0"
		echo "file /init $dir/init 0755 0 0"
		echo "file /work $groot/work 0755 0 0"
	} > "$out/guest.list"
	"$gen_cpio" "$out/guest.list" > "$root/kvm_luo/guest/initrd.cpio" || return 1
	cp "$bz" "$root/kvm_luo/guest/bzImage"
}

# QEMU as an inner VMM (-q): the binary, the libraries it links (run through
# the dynamic loader packed with them) and the firmware a PC boot reads.
build_qemu() {
	local bin=/usr/bin/qemu-system-x86_64 d=$root/qemu lib
	[ "$qemu" = 1 ] || return 0
	mkdir -p "$d/lib" "$d/share" || return 1
	cp "$bin" "$d/" || return 1
	for lib in $(ldd "$bin" | awk '$2 == "=>" && $3 ~ /^\// { print $3 }
				       $1 ~ /^\/.*ld-linux/ { print $1 }'); do
		cp -L "$lib" "$d/lib/" || return 1
	done
	cp -L /usr/share/seabios/bios-256k.bin /usr/share/qemu/linuxboot_dma.bin \
		/usr/share/qemu/kvmvapic.bin "$d/share/" || return 1
}

build_kvm() {
	local progs=(guest_memfd_test set_memory_region_test x86/sync_regs_test)
	make -s -C "$sel/kvm" ARCH=x86_64 OUTPUT="$out/kvm" \
		KHDR_INCLUDES="-isystem $hdrs" EXTRA_CFLAGS=-static \
		"${progs[@]/#/$out/kvm/}" || return 1
	local p
	for p in "${progs[@]}"; do
		mkdir -p "$root/kvm/$(dirname "$p")"
		cp "$out/kvm/$p" "$root/kvm/$p"
	done
}

# KVM's modules, when the kernel builds KVM as modules (as distributions do):
# init loads them from /modules before a test runs (klu_kvm_modules.h).
# They come from the build of the kernel that boots (-k may be another one's).
build_modules() {
	local ko kobj
	kobj=$(cd "$(dirname "$kernel")/../../.." && pwd) || return 1
	grep -q '^CONFIG_KVM=m' "$kobj/.config" 2>/dev/null || return 0
	mkdir -p "$root/modules"
	for ko in arch/x86/kvm/kvm arch/x86/kvm/kvm-amd arch/x86/kvm/kvm-intel; do
		cp "$kobj/$ko.ko" "$root/modules/" || return 1
	done
	if grep -q '^CONFIG_IRQ_BYPASS_MANAGER=m' "$kobj/.config"; then
		cp "$kobj/virt/lib/irqbypass.ko" "$root/modules/" || return 1
	fi
}

build_initramfs() {
	gcc -static -Os -Wall -o "$root/init" "$here/init.c" || return 1
	mkdir -p "$root/etc"
	local l
	for l in "${list_cpus[@]}"; do
		cat "${l% *}"
	done > "$root/etc/klu-tests"

	# One image for every kernel of a test: its files, and the kernel to
	# kexec to. Every kernel boots with retain_initrd, which keeps the image
	# it booted from in memory as /sys/firmware/initrd, and /initrd.img
	# names that: each kernel kexecs into the very image it booted, so any
	# number of kexecs boot the same kernel from the same image (a bare kexec
	# and a live update differ only in what they preserve).
	local list=$out/cpio.list
	{
		echo "dir /dev 0755 0 0"
		echo "nod /dev/console 0600 0 0 c 5 1"
		echo "dir /proc 0755 0 0"
		echo "dir /sys 0755 0 0"
		echo "dir /tmp 1777 0 0"
		(cd "$root" && find . -mindepth 1 | sort) | while read -r p; do
			p=${p#.}
			if [ -d "$root$p" ]; then
				echo "dir $p 0755 0 0"
			else
				echo "file $p $root$p $(stat -c %a "$root$p") 0 0"
			fi
		done
		echo "file /kernel $kernel 0644 0 0"
		echo "slink /initrd.img /sys/firmware/initrd 0777 0 0"
	} > "$list"
	"$gen_cpio" "$list" > "$out/initramfs.cpio"
}

# --- run -------------------------------------------------------------------

# The tests to run, one "NAME CPUS KIND TIMEOUT [BOOT_ARG...]" line each,
# longest timeout first (with -j, the long ones then do not end the run
# alone). A test's boot:WORD arguments put WORD on its first kernel's command
# line (init carries it to the next kernels unless it is a handler's parameter:
# see next_only() in init.c).
test_lines() {
	local l name kind tmo args w boot
	for l in "${list_cpus[@]}"; do
		grep -v -e '^#' -e '^[[:space:]]*$' "${l% *}" | while read -r name kind tmo args; do
			if [ ${#only[@]} -eq 0 ] || [[ " ${only[*]} " == *" $name "* ]]; then
				boot=""
				read -ra args <<< "$args"
				for w in "${args[@]}"; do
					[[ "$w" != boot:* ]] || boot="$boot ${w#boot:}"
				done
				echo "$name ${l##* } $kind $tmo$boot"
			fi
		done
	done | sort -s -k4,4nr
}

# Every boot is a machine with two NUMA nodes (numa=fake=2), as hosts are.
# QEMU logs a triple fault of the machine (and every CPU reset) in LOG.qemu.
# A machine still running at the deadline is asked what it is doing before it
# is stopped (watchdog): QEMU's NMI reaches the boot CPU, and an unknown NMI
# panics the kernel, which prints every CPU's backtrace, the blocked tasks and
# the locks they hold. Returns 124 when the deadline stopped it.
#
# tsc=reliable: the TSC of QEMU's TCG is the host's, the same on every CPU,
# and the clocksource watchdog of 7.3 can deadlock a boot. Seen once
# (2026-12-06, luo_kexec_simple, first kernel, before init): CPU 0 in the
# watchdog's timer, interrupts off, spinning in watchdog_check_skew() for a
# reply from CPU 1, which sat in stop_machine() with its interrupts off; the
# spin's timeout reads a clock that was still jiffies, which CPU 0's disabled
# tick no longer moved.
boot() {	# boot NAME TIMEOUT LOG EXTRA_CMDLINE INITRAMFS CPUS
	local cmdline="console=ttyS0 panic=-1 oops=panic liveupdate=on numa=fake=2 retain_initrd"
	cmdline+=" tsc=reliable klu.test=$1"
	cmdline+=" $debug_cmdline unknown_nmi_panic panic_sys_info=all_bt,blocked_tasks,locks $4"
	local initrd=$5 mon_dir qemu_pid dog status prealloc=()
	[ "${KLU_QEMU_PREALLOC:-0}" = 1 ] && prealloc=(-mem-prealloc)
	rm -f "$3.hang"
	mon_dir=$(mktemp -d "$mon_root/XXXXXX") || return 1
	timeout --foreground -k 10 "$(($2 + 60))" qemu-system-x86_64 9>&- \
		-accel tcg -cpu max -smp "$6" \
		-m "$qemu_mem" "${prealloc[@]}" -nographic -nodefaults -no-reboot -d cpu_reset \
		-serial file:"$3" -monitor unix:"$mon_dir/mon",server=on,wait=off \
		-kernel "$kernel" -initrd "$initrd" \
		-append "$cmdline" </dev/null >"$3.qemu" 2>&1 &
	qemu_pid=$!
	watchdog "$2" "$mon_dir/mon" "$3.hang" "$qemu_pid" 9>&- &
	dog=$!
	wait "$qemu_pid"
	status=$?
	kill "$dog" 2>/dev/null
	wait "$dog" 2>/dev/null
	rm -rf "$mon_dir"
	[ -e "$3.hang" ] && return 124
	return "$status"
}

# At the deadline, if the machine still runs: an NMI, up to 30 s for the
# panic's report to reach the serial log and the machine to stop, then every
# CPU's registers from QEMU; then it is stopped. Notes in HANG. Stopped by a
# signal, it stops its sleep too (a job's sleep would hold the runner's
# output open until the deadline), and it waits to be stopped after stopping
# the machine, so that boot never signals a reused pid.
watchdog() {	# watchdog SECONDS MONITOR HANG PID
	local sleeper="" i
	trap '[ -z "$sleeper" ] || kill "$sleeper" 2>/dev/null; exit 0' TERM INT HUP QUIT
	sleep "$1" &
	sleeper=$!
	wait "$sleeper"
	sleeper=""
	kill -0 "$4" 2>/dev/null || exit 0
	{ echo "# still running after $1 s: an NMI"; monitor "$2" nmi; } >> "$3"
	for i in $(seq 30); do
		sleep 1
		kill -0 "$4" 2>/dev/null || exit 0
	done
	{ echo "# still running 30 s after the NMI: every CPU's registers"
	  monitor "$2" "info registers -a"; } >> "$3"
	kill -TERM "$4"
	sleep 120 &
	sleeper=$!
	wait "$sleeper"
}

# Sends HMP commands to a QEMU monitor socket and prints the answers.
monitor() {	# monitor SOCKET COMMAND...
	python3 - "$@" 2>&1 <<'PY'
import socket, sys, time
try:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(5)
    s.connect(sys.argv[1])
except OSError as e:
    sys.exit(f"no QEMU monitor at {sys.argv[1]}: {e}")
def answer():
    got = b""
    end = time.monotonic() + 10
    while not got.endswith(b"(qemu) ") and time.monotonic() < end:
        try:
            part = s.recv(65536)
        except OSError:
            break
        if not part:
            break
        got += part
    return got.decode(errors="replace")
answer()
for cmd in sys.argv[2:]:
    try:
        s.sendall(cmd.encode() + b"\n")
    except OSError as e:
        sys.exit(f"the QEMU monitor went away: {e}")
    sys.stdout.write(answer() + "\n")
PY
}

# Kernel trouble in a log, as one line, or nothing: panics, BUG (KASAN among
# them), WARNING (lockdep among them), UBSAN, hung tasks, RCU stalls, soft
# lockups, leaks kmemleak found by itself. (A bare call trace is not trouble:
# the fault_inject test makes allocations fail on purpose, and the allocator
# prints a trace for each.)
kernel_trouble() {
	local re='Kernel panic|BUG:|Oops|WARNING:|general protection|UBSAN:'
	re+='|new suspected memory leaks|INFO: task .* blocked|detected stalls|soft lockup'
	grep -m1 -E "$re" "$1"
}

# On a debug kernel, every stage that ran (given as "S" per stage) must have
# reported a kmemleak scan with no unreferenced object: prints the first
# problem, or nothing.
kmemleak_trouble() {	# kmemleak_trouble LOG NAME STAGE...
	local log=$1 name=$2 stage line n
	shift 2
	[ "$debug_kernel" = 1 ] || return 0
	for stage in "$@"; do
		line=$(tr -d '\r' < "$log" | grep -m1 "KLU: kmemleak: stage $stage of $name:")
		if [ -z "$line" ]; then
			echo "no kmemleak scan after stage $stage"
			return
		fi
		n=$(echo "$line" | sed -E 's/.*: ([0-9]+) unreferenced objects.*/\1/')
		if [ "$n" != 0 ]; then
			echo "kmemleak: $n unreferenced objects after stage $stage"
			return
		fi
	done
}

# One result per KUnit suite from the KTAP the kernel printed.
kunit_results() {	# kunit_results LOG SECONDS
	local log=$1 secs=$2 plan got=0
	local lines
	lines=$(sed -E 's/^\[ *[0-9]+\.[0-9]+\] //' "$log" | tr -d '\r')
	plan=$(echo "$lines" | grep -m1 -E '^1\.\.[0-9]+$' | cut -d. -f3)
	if [ -z "$plan" ]; then
		record FAIL kunit "$secs" "no KTAP plan in $log"
		return
	fi
	while read -r verdict rest; do
		local name
		if [ "$verdict" = ok ]; then
			name=$(echo "$rest" | awk '{print $2}')
			if [[ "$rest" == *"# SKIP"* ]]; then
				record FAIL "kunit:$name" "$secs" "skipped"
			else
				record PASS "kunit:$name" "$secs"
			fi
		else
			name=$(echo "$rest" | awk '{print $3}')
			record FAIL "kunit:$name" "$secs" "see $log"
		fi
		got=$((got + 1))
	done < <(echo "$lines" | grep -E '^(not )?ok [0-9]+ ')
	[ "$got" -eq "$plan" ] || record FAIL kunit "$secs" "$got of $plan suites reported"
}

run_test() {	# run_test NAME CPUS KIND TIMEOUT BOOT_ARGS; then "DONE NAME" in the tally
	run_one "$@"
	echo "DONE $1" >> "$tally"
}

run_one() {
	local name=$1 cpus=$2 kind=$3 tmo=$(($4 * (jobs + 1) / 2)) log=$logs/$1.log
	local extra="kunit.enable=0 ${5:-}"
	local start secs status trouble why
	[ "$kind" = boot ] && extra="${5:-}"
	[ "${KLU_INJECT_FAIL:-}" = "$name" ] && extra="$extra klu.expect=1"
	rm -f "$log" "$log.qemu" "$log.hang"
	local initrd=$out/initramfs.cpio stages=1 s
	case $kind in
	kexec) stages="1 2" ;;
	kexec[2-9]|kexec1[0-9]|kexec20) stages=$(seq -s ' ' 1 $((${kind#kexec} + 1))) ;;
	agent) stages="1 2" ;;
	boot) stages="" ;;
	esac
	start=$(date +%s.%N)
	boot "$name" "$tmo" "$log" "$extra" "$initrd" "$cpus"
	status=$?
	secs=$(printf '%.1f' "$(echo "$(date +%s.%N) - $start" | bc)")

	if [ "$status" = 124 ] || [ "$status" = 137 ]; then
		why="its CPUs at the deadline: in the log and $log.hang"
		record FAIL "$name" "$secs" "timed out after ${tmo}s, log $log ($why)"
		return
	fi
	if grep -q '^Triple fault' "$log.qemu"; then
		why="the QEMU machine took a triple fault"
		why+=$(t=$(kernel_trouble "$log") && echo " after: $t")
		record FAIL "$name" "$secs" "$why (log $log, CPU state in $log.qemu)"
		return
	fi
	if [ ! -s "$log" ]; then
		record FAIL "$name" "$secs" "no serial output (qemu status $status, $log.qemu)"
		return
	fi
	trouble=$(kernel_trouble "$log")
	if [ -n "$trouble" ]; then
		record FAIL "$name" "$secs" "kernel: $trouble (log $log)"
		return
	fi
	# An "agent" test kexecs from under its first stage: only the last stage
	# ends with a kmemleak scan.
	local scanned=$stages
	[ "$kind" = agent ] && scanned=2
	trouble=$(kmemleak_trouble "$log" "$name" $scanned)
	if [ -n "$trouble" ] && grep -q "KLU: stage .* of $name: PASS" "$log"; then
		record FAIL "$name" "$secs" "$trouble (log $log)"
		return
	fi
	case $kind in
	boot)
		kunit_results "$log" "$secs" ;;
	single)
		if grep -q "KLU: stage 1 of $name: PASS" "$log"; then
			record PASS "$name" "$secs"
		else
			why=$(grep -m1 "KLU: stage 1 of $name" "$log" | tail -c +1 ||
			      echo 'no result')
			record FAIL "$name" "$secs" "$why (log $log)"
		fi ;;
	kexec|kexec[2-9]|kexec1[0-9]|kexec20|agent)
		for s in $stages; do
			if ! grep -q "KLU: stage $s of $name: PASS" "$log"; then
				record FAIL "$name" "$secs" "stage $s did not pass (log $log)"
				return
			fi
		done
		record PASS "$name" "$secs" ;;
	*)
		record FAIL "$name" "$secs" "unknown kind $kind" ;;
	esac
}

main() {
	# One run at a time per output directory: another run would remove
	# this one's binaries. Logs of tests this run does not run stay (make
	# test and make test-nested use the same directory).
	mkdir -p "$out"
	exec 9>"$out/.lock"
	if ! flock -n 9; then
		echo "# waiting for another run using $out"
		flock 9
	fi
	rm -rf "$root"
	mkdir -p "$logs" "$root"
	# The machines' monitor sockets, in /tmp: a socket's path must be short.
	mon_root=$(mktemp -d /tmp/klu-run.XXXXXX) || exit 2
	tally=$out/tally
	: > "$tally"
	local lines name ncpus kind tmo boot_args
	lines=$(test_lines)
	# Nothing left of an earlier run of these tests is taken for this one's.
	while read -r name _; do
		[ -z "$name" ] ||
			rm -f "$logs/$name.log" "$logs/$name.log.qemu" "$logs/$name.log.hang"
	done <<< "$lines"
	echo "# building test binaries and the initramfs in $out"
	if ! { build_liveupdate && build_kvm_luo && build_vmm && build_guest && build_kvm &&
	       build_qemu && build_modules && build_initramfs; }; then
		record FAIL "runner-build:$run_name" 0 "building the tests failed"
	else
		[ -n "$lines" ] ||
			record FAIL "runner-select:$run_name" 0 "no test matches: ${only[*]}"
		# Stopped, the runner stops its machines (they are in its
		# process group, timeout --foreground, so a signal to the whole
		# group reaches them too) and dies of the same signal.
		local sig stop
		stop='for p in $(jobs -p); do pkill -TERM -P $p; kill $p; done 2>/dev/null'
		for sig in INT TERM; do
			# shellcheck disable=SC2064
			trap "$stop; rm -rf \"\$mon_root\"; trap - $sig; kill -$sig \$\$" $sig
		done
		while read -r name ncpus kind tmo boot_args; do
			[ -n "$name" ] || continue
			while [ "$(jobs -rp | wc -l)" -ge "$jobs" ]; do
				wait -n
			done
			run_test "$name" "$ncpus" "$kind" "$tmo" "$boot_args" </dev/null &
		done <<< "$lines"
		wait
		trap - INT TERM
		# A test whose job died before it finished failed.
		while read -r name _; do
			[ -n "$name" ] || continue
			grep -qxF "DONE $name" "$tally" ||
				record FAIL "$name" 0 "the job running it died before it finished"
		done <<< "$lines"
	fi
	rm -rf "$mon_root"
	local passed failed
	passed=$(grep -c '^PASS ' "$tally")
	failed=$(grep -c '^FAIL ' "$tally")
	# What each failure's log says, in a few lines: CI keeps only this
	# output.
	local log
	for log in $(awk '$1 == "FAIL" { sub(/:.*/, "", $2); print $2 }' "$tally" | sort -u); do
		[ -s "$logs/$log.log" ] || continue
		echo "# $log, from its log:"
		python3 "$here/log_digest.py" "$logs/$log.log"
	done
	echo "# logs: $logs"
	[ "$failed" -eq 0 ] || echo "# failed: $(awk '$1 == "FAIL" { printf "%s ", $2 }' "$tally")"
	echo "$passed passed, $failed failed"
	[ "$failed" -eq 0 ]
}

main
