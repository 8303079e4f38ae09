#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-2.0
#
# The soak: boots the nested Linux guest of vmm_linux_guest N times, one QEMU
# machine each, and counts the outcomes by kind, so that a failure seen once
# in make check can be told apart: ours (it happens with our kernel and not
# with the unpatched base) or the emulator's (it happens with both).
#
# Usage: build/soak.sh [-n N] [-k release|debug|base] [-c CPUS] [-m boot|update]
#                      [-w SECS] [-j JOBS] [-q] [-- VMM OPTIONS...]
#   -n  boots (default 20)
#   -k  the host kernel: ours without debug options (release, the default),
#       ours with them (debug, what make check runs), or the unpatched base
#       with the release configuration (base; boot only: it has no handlers)
#   -c  CPUs of each QEMU machine (default 1, as make check's nested tests)
#   -m  boot: the guest's first boot only, then watched for -w seconds (every
#       vCPU must keep taking timer interrupts, and the guest say nothing
#       wrong); update: the whole of vmm_linux_guest (boot, live update,
#       resume, checks, a bare kexec)
#   -w  seconds to watch the guest in boot mode (default 30: longer than the
#       guest's RCU stall timeout, 21 s)
#   -j  QEMU machines at once (default 1; the machine has 2 cores)
#   -q  the inner VMM is QEMU itself, with the same guest kernel and
#       initramfs, instead of ours (boot mode only)
#   VMM OPTIONS go to kvm-luo-vmm: --vcpus N, --ram anon, --no-tsc-deadline,
#       --no-kvmclock, ... (kvm-luo-vmm --help)
#
# Each cell's line goes to $KLU_CACHE/soak.txt, and the boots' logs stay in
# $KLU_CACHE/out-soak/<cell>/. Outcomes:
#   pass          the runner passed it
#   timer         a guest vCPU took no timer interrupts, or the guest reported
#                 an RCU stall or a soft lockup
#   guest-triple  a guest vCPU took a triple fault (KVM_EXIT_SHUTDOWN)
#   host-triple   the QEMU machine (the host kernel) took a triple fault
#   host-oops     the host kernel reported a BUG, oops, GPF or WARNING
#   other         anything else (the first line that says why is kept)
set -uo pipefail
unset KLU_KERNEL	# the assembled tree (KLU_SRC) whatever the caller's kernel
. "$(dirname "$0")/common.sh"

# The whole script is one function, read before it runs, and the line that
# runs it also exits: editing this file while a soak runs does not change that
# soak (an edit in place may move what bash would read after main).
main() {
	n=20 kernel=release cpus=1 mode=boot watch=30 jobs=1 qemu=0
	while getopts 'n:k:c:m:w:j:qh' opt; do
		case $opt in
		n) n=$OPTARG ;;
		k) kernel=$OPTARG ;;
		c) cpus=$OPTARG ;;
		m) mode=$OPTARG ;;
		w) watch=$OPTARG ;;
		j) jobs=$OPTARG ;;
		q) qemu=1 ;;
		*) sed -n '2,/^$/s/^# \{0,1\}//p' "$0"; exit 2 ;;
		esac
	done
	shift $((OPTIND - 1))
	vmm_opts=("$@")
	[[ "$n" =~ ^[0-9]+$ ]] && [ "$n" -ge 1 ] || klu_die "-n takes a number of boots"
	[[ "$jobs" =~ ^[1-4]$ ]] || klu_die "-j takes 1 to 4"
	[[ "$watch" =~ ^[0-9]+$ ]] || klu_die "-w takes seconds"
	[[ "$cpus" =~ ^[1-8]$ ]] || klu_die "-c takes 1 to 8 CPUs"
	[ "$jobs" -le "$n" ] || jobs=$n
	case $kernel in release|debug|base) ;; *) klu_die "-k takes release, debug or base" ;; esac
	case $mode in boot|update) ;; *) klu_die "-m takes boot or update" ;; esac
	[ "$kernel$mode" != baseupdate ] || klu_die "the unpatched base has no handlers: -m boot only"
	[ "$qemu$mode" != 1update ] || klu_die "QEMU as the inner VMM: -m boot only"

	# The kernels: the one booted, and ours (release or debug) for the headers,
	# gen_init_cpio and the test binaries; and the guest's.
	KLU_KERNEL=guest "$KLU_TOP/build/kernel.sh" all >&2 || klu_die "the guest kernel does not build"
	case $kernel in
	debug) hdr_kernel=debug ;;
	*) hdr_kernel=release ;;
	esac
	KLU_KERNEL=$hdr_kernel "$KLU_TOP/build/kernel.sh" all >&2 || klu_die "the $hdr_kernel kernel does not build"
	if [ "$kernel" = base ]; then
		KLU_KERNEL=base "$KLU_TOP/build/kernel.sh" all >&2 || klu_die "the base kernel does not build"
	fi
	obj_of() { KLU_KERNEL=$1 bash -c ". '$KLU_TOP/build/common.sh'; echo \$KLU_OBJ"; }
	hdr_obj=$(obj_of "$hdr_kernel")
	boot_obj=$(obj_of "$kernel")

	cell="$kernel cpus=$cpus $mode$([ "$qemu" = 1 ] && echo " inner=qemu")${vmm_opts[*]:+ ${vmm_opts[*]}}"
	slug=$(echo "$cell" | tr -c 'A-Za-z0-9=\n-' '_' | tr -s _)
	out=$KLU_CACHE/out-soak
	cells=$out/$slug
	rm -rf "$cells"
	mkdir -p "$cells"

	# The list: N tests that are the same test.
	guest_args="--linux /kvm_luo/guest/bzImage --initrd /kvm_luo/guest/initrd.cpio --mem 256"
	list=$cells/soak.list
	{
		echo "# The soak's cell: $cell"
		for i in $(seq "$n"); do
			if [ "$qemu" = 1 ]; then
				echo "soak_$i single 400 /kvm_luo/kvm-luo-vmm $guest_args -s boot --watch $watch --inner-qemu /qemu ${vmm_opts[*]}"
			elif [ "$mode" = boot ]; then
				echo "soak_$i single 400 /kvm_luo/kvm-luo-vmm $guest_args -s boot --watch $watch ${vmm_opts[*]}"
			else
				echo "soak_$i kexec2 1500 /kvm_luo/kvm-luo-vmm $guest_args ${vmm_opts[*]}"
			fi
		done
	} > "$list"

	klu_log "soak: $n boots of: $cell"
	start=$(date +%s)
	runner=("$KLU_TOP/tools/testing/selftests/kvm_luo/run_vmtests.sh" -s "$KLU_SRC"
		-b "$hdr_obj" -k "$boot_obj/arch/x86/boot/bzImage" -g "$KLU_CACHE/build-guest"
		-l "$list" -c "$cpus")
	[ "$qemu" = 0 ] || runner+=(-q)
	results=$cells/results
	: > "$results"
	# Every job builds the same binaries into its own directory first (the
	# runner's lock is per directory); then each runs its share of the boots.
	# No log of an earlier soak is taken for this one's.
	rm -f "$out"/job*/logs/soak_*
	pids=()
	for j in $(seq "$jobs"); do
		tests=()
		for i in $(seq "$j" "$jobs" "$n"); do tests+=(-t "soak_$i"); done
		"${runner[@]}" -o "$out/job$j" -r "$results.$j" "${tests[@]}" > "$cells/runner.$j.log" 2>&1 &
		pids+=($!)
	done
	wait "${pids[@]}"
	cat "$results".* > "$results" 2>/dev/null

	# The first line of a log that matches ERE $3 (with $2 = -v: outside the guest's and the
	# VMM's own lines), or nothing. Decided by the output, not the status: with pipefail, the
	# commands before a grep that stops at its first match may die of SIGPIPE.
	first() {
		tr -d '\r' < "$1" | { if [ "$2" = -v ]; then grep -v -E '^(guest|vmm)[^:]*:'; else cat; fi; } |
			grep -E "$3" | head -n 1
	}

	# One outcome per boot.
	declare -A count=([pass]=0 [timer]=0 [guest-triple]=0 [host-triple]=0 [host-oops]=0 [other]=0)
	: > "$cells/outcomes"
	for i in $(seq "$n"); do
		log=""
		for j in $(seq "$jobs"); do
			[ -f "$out/job$j/logs/soak_$i.log" ] && log=$out/job$j/logs/soak_$i.log
		done
		if [ -n "$log" ]; then
			cp "$log" "$cells/soak_$i.log"
			cp "$log.qemu" "$cells/soak_$i.log.qemu" 2>/dev/null
			log=$cells/soak_$i.log
		fi
		why=""
		if grep -q "^PASS soak_$i " "$results"; then
			kind=pass
		elif [ -z "$log" ] || [ ! -s "$log" ]; then
			kind=other why="no log"
		elif grep -q '^Triple fault' "$log.qemu" 2>/dev/null; then
			kind=host-triple why=$(grep -m1 -E '^\[' "$log" | tail -c 200)
		elif why=$(first "$log" -v 'BUG:|Oops|general protection|WARNING:|Kernel panic|UBSAN:|refcount_t'); [ -n "$why" ]; then
			kind=host-oops
		elif why=$(first "$log" '' 'exit Shutdown|triple fault'); [ -n "$why" ]; then
			kind=guest-triple
		elif why=$(first "$log" '' 'take no timer interrupts|detected stall|timer handling|soft lockup|no heartbeat'); [ -n "$why" ]; then
			kind=timer
		else
			kind=other
			why=$(first "$log" '' 'FAILED|FAIL|timed out')
			[ -n "$why" ] || why="see $log"
		fi
		count[$kind]=$((count[$kind] + 1))
		printf 'soak_%s %s %s\n' "$i" "$kind" "$why" >> "$cells/outcomes"
	done

	line=$(printf '%-60s boots %3d  pass %3d  timer %2d  guest-triple %2d  host-triple %2d  host-oops %2d  other %2d  (%d s)' \
		"$cell" "$n" "${count[pass]}" "${count[timer]}" "${count[guest-triple]}" \
		"${count[host-triple]}" "${count[host-oops]}" "${count[other]}" "$(($(date +%s) - start))")
	echo "$line" | tee -a "$KLU_CACHE/soak.txt"
	grep -v ' pass ' "$cells/outcomes" | head -n 20
	echo "# logs: $cells"
	[ "${count[pass]}" = "$n" ]
}

# One line: bash has read all of it before main runs, and reads nothing after.
main "$@"; exit
