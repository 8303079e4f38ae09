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
#   debian                    Debian's own configuration of the base
#                             (linux-config-7.3, installed by setup) with the
#                             options the feature needs and nothing else: KVM
#                             modular, debug info and BTF, no debug options;
#                             KVM's objects build here too
set -uo pipefail
. "$(dirname "$0")/common.sh"

results=""
[ "${1:-}" = -r ] && results=$2
failed=0

# The project's Rust files in the kernel tree, for the warning check.
project_rust() {
	git -C "$KLU_TOP" ls-files -- rust virt | grep '\.rs$'
}

# check [-b BASECONFIG] [-t DIR]... NAME ARCH WANT... -- LINES...: configure
# with the project fragment (no debug options), or with BASECONFIG instead,
# plus LINES; require every WANT line in the result (or, for "!LINE", its
# absence); build rust/ (and the handlers, KVM's objects when built in, and
# every DIR).
check() {
	local base=$KLU_TOP/kernel/configs/kvm_luo.config extra=()
	while [ $# -gt 0 ]; do
		case $1 in
		-b) base=$2; shift 2 ;;
		-t) extra+=("$2"); shift 2 ;;
		*) break ;;
		esac
	done
	local name=$1 arch=$2 t0=$SECONDS dir=$KLU_CACHE/cfg/$1 want=() lines=()
	shift 2
	while [ $# -gt 0 ] && [ "$1" != -- ]; do want+=("$1"); shift; done
	shift
	lines=("$@")
	local make=(make -C "$KLU_SRC" O="$dir" LLVM=-19 ARCH="$arch" -j"$(nproc)")
	local log=$dir/build.log cfg
	mkdir -p "$dir"
	if [ ! -r "$base" ]; then
		klu_record FAIL "build:$name" 0 "no base configuration $base (run build/setup.sh)"
		return
	fi
	cfg=$(cat "$base"; printf '%s\n' "${lines[@]}")
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
	targets+=("${extra[@]}")
	# An object make does not rebuild prints no warnings. So the project's
	# objects that the build leaves alone are rebuilt in a second pass,
	# unless none was rebuilt and warnings.log holds what the build of these
	# very objects printed (warnings.objs: their paths and mtimes then).
	local warnings=$dir/warnings.log objs=$dir/warnings.objs before after stale
	before=$(project_objects "$dir")
	if ! "${make[@]}" -s "${targets[@]}" > "$log" 2>&1; then
		grep -m20 -E '^(error|warning)' "$log"
		rm -f "$warnings" "$objs"
		klu_record FAIL "build:$name" $((SECONDS - t0)) "build failed, log $log"
		return
	fi
	after=$(project_objects "$dir")
	if [ -z "$after" ] || [ "$before" != "$after" ] || [ ! -f "$warnings" ] ||
	   [ "$(cat "$objs" 2>/dev/null)" != "$after" ]; then
		rm -f "$warnings" "$objs"
		stale=$(comm -12 <(echo "$before") <(echo "$after") | cut -d' ' -f1)
		if [ -n "$stale" ]; then
			rm -f $stale
			if ! "${make[@]}" -s "${targets[@]}" >> "$log" 2>&1; then
				klu_record FAIL "build:$name" $((SECONDS - t0)) "build failed, log $log"
				return
			fi
		fi
		cp "$log" "$warnings"
		project_objects "$dir" > "$objs"
	fi
	if grep -E -- '--> ' "$warnings" | grep -qF -f <(project_rust); then
		grep -B8 -A6 -F -f <(project_rust) "$warnings" | head -40
		rm -f "$warnings" "$objs"
		klu_record FAIL "build:$name" $((SECONDS - t0)) "warnings in project code, log $log"
		return
	fi
	local detail="${targets[*]} ($arch)"
	if [ "$base" != "$KLU_TOP/kernel/configs/kvm_luo.config" ]; then
		# How far olddefconfig (and clang for gcc) moved the base.
		local total changed
		total=$(grep -cE '^(CONFIG_|# CONFIG_.* is not set)' "$base")
		changed=$(grep -E '^(CONFIG_|# CONFIG_.* is not set)' "$base" |
			  grep -cvxF -f "$dir/.config")
		detail+=", $changed of the base's $total settings changed"
	fi
	klu_record PASS "build:$name" $((SECONDS - t0)) "$detail"
}

# The project's objects in build directory $1, one "path mtime" per line.
project_objects() {
	find "$1/rust/kernel.o" "$1/virt/kvm/luo" -name '*.o' -printf '%p %T@\n' 2>/dev/null | sort
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
# A distribution's kernel: Debian's configuration has Rust and modular KVM
# but no KHO. What the feature needs is added, nothing else; the wanted lines
# include some of Debian's own (debug info, BTF) that must survive.
debian_config=$KLU_CACHE/cfg/debian.config
if [ -r "$KLU_DEBIAN_CONFIG" ]; then
	mkdir -p "$KLU_CACHE/cfg"
	xz -dc "$KLU_DEBIAN_CONFIG" > "$debian_config.new" && mv "$debian_config.new" "$debian_config"
else
	rm -f "$debian_config"
fi
check -b "$debian_config" -t arch/x86/kvm/ debian x86_64 'CONFIG_RUST=y' 'CONFIG_KVM=m' \
	'CONFIG_KVM_INTEL=m' 'CONFIG_KVM_AMD=m' 'CONFIG_DEBUG_INFO_BTF=y' \
	'CONFIG_LIVEUPDATE_GUEST_MEMFD=y' -- \
	'CONFIG_KEXEC_HANDOVER=y' 'CONFIG_LIVEUPDATE=y' 'CONFIG_LIVEUPDATE_MEMFD=y' \
	'CONFIG_LIVEUPDATE_GUEST_MEMFD=y'
exit "$failed"
