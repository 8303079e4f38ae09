#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-2.0
#
# The project's Rust code must build in configurations other than the one the
# tests run: compile the kernel crate (and the handlers, when the config has
# them) for each one, in a build directory of its own under $KLU_CACHE/cfg.
# Prints and, with -r FILE, appends one "PASS|FAIL build:<name> seconds" line
# per configuration. A configuration whose option did not take, a build
# error, or a warning in the project's Rust code fails.
#
#   KEXEC_HANDOVER=n          x86_64, no KHO (so no LUO, no handlers)
#   LIVEUPDATE=n              x86_64, KHO without LUO
#   LIVEUPDATE_GUEST_MEMFD=n  x86_64, LUO and KVM without the handlers
#   KVM_GUEST_MEMFD=n         x86_64 with KVM=m and RUST=y but neither Intel nor
#                             AMD support, since KVM_X86 selects KVM_GUEST_MEMFD
#   KVM=y                     x86_64 with KVM, kvm-intel and kvm-amd built in
#                             (the tests' kernels have them as modules)
set -uo pipefail
. "$(dirname "$0")/common.sh"

results=""
[ "${1:-}" = -r ] && results=$2
failed=0

# The project's Rust files in the kernel tree, for the warning check.
project_rust() {
	git -C "$KLU_TOP" ls-files -- rust virt | grep '\.rs$'
}

# check NAME ARCH WANT... -- LINES...: configure with the project fragment
# (no debug options) plus LINES, require every WANT line in the result (or,
# for "!LINE", its absence), build.
check() {
	local name=$1 arch=$2 t0=$SECONDS dir=$KLU_CACHE/cfg/$1 want=() lines=()
	shift 2
	while [ $# -gt 0 ] && [ "$1" != -- ]; do want+=("$1"); shift; done
	shift
	lines=("$@")
	local make=(make -C "$KLU_SRC" O="$dir" LLVM=-19 ARCH="$arch" -j"$(nproc)")
	local log=$dir/build.log cfg
	mkdir -p "$dir"
	cfg=$( (cd "$KLU_TOP" && cat kernel/configs/kvm_luo.config); printf '%s\n' "${lines[@]}")
	# Reconfigure only when the inputs changed, so later runs rebuild only
	# what the project's changes touch.
	if [ "$(cat "$dir/.klu-config" 2>/dev/null)" != "$cfg" ] || [ ! -f "$dir/.config" ]; then
		echo "$cfg" > "$dir/.config"
		if ! "${make[@]}" -s olddefconfig > "$log" 2>&1; then
			klu_record FAIL "build:$name" $((SECONDS - t0)) "olddefconfig failed, log $log"
			return
		fi
		echo "$cfg" > "$dir/.klu-config"
	fi
	local w
	for w in "${want[@]}"; do
		# "!LINE": the config must not have LINE (for options without a
		# prompt, which olddefconfig leaves out instead of "is not set").
		if [ "${w#!}" != "$w" ] && grep -qxF "${w#!}" "$dir/.config"; then
			klu_record FAIL "build:$name" $((SECONDS - t0)) "config has '${w#!}'"
			return
		elif [ "${w#!}" = "$w" ] && ! grep -qxF "$w" "$dir/.config"; then
			klu_record FAIL "build:$name" $((SECONDS - t0)) "config does not have '$w'"
			return
		fi
	done
	local targets=(rust/)
	grep -q '^CONFIG_LIVEUPDATE_GUEST_MEMFD=y' "$dir/.config" && targets+=(virt/kvm/luo/)
	# Built in, KVM's own objects (with what patch 0035 adds) build here too.
	grep -q '^CONFIG_KVM=y' "$dir/.config" && targets+=(arch/x86/kvm/)
	# Rebuild the project's objects so that their warnings are printed again.
	rm -f "$dir/rust/kernel.o" "$dir"/virt/kvm/luo/*.o "$dir"/virt/kvm/luo/*/*.o
	if ! "${make[@]}" -s "${targets[@]}" > "$log" 2>&1; then
		grep -m20 -E '^(error|warning)' "$log"
		klu_record FAIL "build:$name" $((SECONDS - t0)) "build failed, log $log"
		return
	fi
	if grep -E -- '--> ' "$log" | grep -qF -f <(project_rust); then
		grep -B8 -A6 -F -f <(project_rust) "$log" | head -40
		klu_record FAIL "build:$name" $((SECONDS - t0)) "warnings in project code, log $log"
		return
	fi
	klu_record PASS "build:$name" $((SECONDS - t0)) "${targets[*]} ($arch)"
}

[ -f "$KLU_SRC/.klu-copied" ] || klu_die "assemble the tree first (make kernel)"
exec 8>"$KLU_CACHE/.kernel.lock"
flock 8

check KEXEC_HANDOVER=n x86_64 '# CONFIG_KEXEC_HANDOVER is not set' 'CONFIG_RUST=y' 'CONFIG_KVM=m' -- \
	'# CONFIG_KEXEC_HANDOVER is not set'
check LIVEUPDATE=n x86_64 '# CONFIG_LIVEUPDATE is not set' 'CONFIG_KEXEC_HANDOVER=y' 'CONFIG_KVM=m' -- \
	'# CONFIG_LIVEUPDATE is not set'
check LIVEUPDATE_GUEST_MEMFD=n x86_64 '# CONFIG_LIVEUPDATE_GUEST_MEMFD is not set' \
	'CONFIG_LIVEUPDATE=y' 'CONFIG_KVM=m' 'CONFIG_RUST=y' -- \
	'# CONFIG_LIVEUPDATE_GUEST_MEMFD is not set'
check KVM_GUEST_MEMFD=n x86_64 '!CONFIG_KVM_GUEST_MEMFD=y' 'CONFIG_KVM=m' \
	'CONFIG_RUST=y' 'CONFIG_LIVEUPDATE=y' -- \
	'# CONFIG_KVM_INTEL is not set' '# CONFIG_KVM_AMD is not set' \
	'# CONFIG_KVM_SW_PROTECTED_VM is not set'
check KVM=y x86_64 'CONFIG_KVM=y' 'CONFIG_KVM_INTEL=y' 'CONFIG_KVM_AMD=y' \
	'CONFIG_LIVEUPDATE_GUEST_MEMFD=y' -- \
	'CONFIG_KVM=y' 'CONFIG_KVM_INTEL=y' 'CONFIG_KVM_AMD=y'
exit "$failed"
