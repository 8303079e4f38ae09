# SPDX-License-Identifier: GPL-2.0
# Shared settings for the project's build scripts. Sourced, not executed.

# Where the project lives, and the persistent cache outside the clone that
# keeps the base tree, the assembled tree and the kernel build between runs.
KLU_TOP=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
KLU_CACHE=${KLU_CACHE:-$HOME/.cache/kvm-luo}

# The base kernel: Debian's linux-source-7.3 package.
KLU_BASE_TARBALL=${KLU_BASE_TARBALL:-/usr/src/linux-source-7.3.tar.xz}
# Debian's configuration of the same kernel (linux-config-7.3), for build:debian.
KLU_DEBIAN_CONFIG=${KLU_DEBIAN_CONFIG:-/usr/src/linux-config-7.3/config.amd64_none_amd64.xz}
KLU_BASE=$KLU_CACHE/base	# pristine unpacked base, never modified
KLU_SRC=$KLU_CACHE/src		# base + project files + patches

# Two kernels from the same tree: "debug" (lockdep, KASAN, UBSAN, kmemleak and
# friends; every test of make check runs on it) and "release" (no debug
# options; make demo and make bench, so that their timings mean something).
# And for the soak's comparisons (build/soak.sh), "base": the unpatched base
# tree with the release configuration, less the options only the project
# defines.
KLU_KERNEL=${KLU_KERNEL:-debug}
case $KLU_KERNEL in
debug)	 KLU_OBJ=$KLU_CACHE/build;		KLU_OUT=$KLU_CACHE/out ;;
release) KLU_OBJ=$KLU_CACHE/build-release;	KLU_OUT=$KLU_CACHE/out-release ;;
guest)	 KLU_OBJ=$KLU_CACHE/build-guest;	KLU_OUT=$KLU_CACHE/out-guest ;;
base)	 KLU_OBJ=$KLU_CACHE/build-base;		KLU_OUT=$KLU_CACHE/out-base
	 KLU_SRC=$KLU_BASE ;;
*)	 echo "error: KLU_KERNEL must be debug, release, guest or base" >&2; exit 1 ;;
esac
# The configuration fragments of each kernel, applied in this order. The host
# kernels start from the defaults, the guest's from allnoconfig.
case $KLU_KERNEL in
guest)	KLU_FRAGMENTS=(kernel/configs/kvm_luo_guest.config) ;;
*)	KLU_FRAGMENTS=(kernel/configs/kvm_luo.config) ;;
esac
[ "$KLU_KERNEL" = debug ] && KLU_FRAGMENTS+=(kernel/configs/kvm_luo_debug.config)

export LIBCLANG_PATH=${LIBCLANG_PATH:-/usr/lib/llvm-19/lib}
export PATH=$HOME/.cargo/bin:$PATH

KLU_MAKE=(make -C "$KLU_SRC" O="$KLU_OBJ" LLVM=-19 ARCH=x86_64 -j"$(nproc)")

# The userspace Rust crates (cargo packages), at their paths in the tree.
KLU_CRATES=(tools/liveupdate tools/kvm_luo_protocol tools/kvm_luo_agent tools/kvm_luo_vmm
	tools/testing/selftests/kvm_luo/fleet)
# Those of them with tests of their own (cargo test, counted in make check).
KLU_TESTED_CRATES=("${KLU_CRATES[@]}")

# The project directories that hold new files at their kernel paths.
KLU_KERNEL_DIRS=(Documentation include kernel mm rust virt tools arch)

klu_log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
klu_die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# klu_record PASS|FAIL NAME SECONDS [DETAIL]: print a summary line, add it to
# the file $results if that is set, and set failed=1 on FAIL.
klu_record() {
	[ "$1" = PASS ] || failed=1
	printf '%-6s %-34s %6ss  %s\n' "$([ "$1" = PASS ] && echo ok || echo FAIL)" "$2" "$3" "${4:-}"
	[ -z "${results:-}" ] || echo "$1 $2 $3" >> "$results"
}
