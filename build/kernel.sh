#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-2.0
#
# Assemble the kernel tree (base + the project's new files + its patches) and
# build it out of tree. Usage: build/kernel.sh [assemble|config|build|all]
#
# The assembled tree lives in $KLU_SRC and is updated in place: a file is
# rewritten only when its content changes, so Kbuild recompiles only what
# depends on the files that really changed.
set -euo pipefail
. "$(dirname "$0")/common.sh"

STATE=$KLU_CACHE/assembled.list

# Paths (relative to the tree) touched by one patch.
patch_targets() {
	sed -n -e 's|^+++ b/\([^[:space:]]*\).*|\1|p' -e 's|^--- a/\([^[:space:]]*\).*|\1|p' "$1" |
		sort -u
}

project_files() {
	git -C "$KLU_TOP" ls-files --cached --others --exclude-standard -- \
		"${KLU_KERNEL_DIRS[@]}" | while read -r f; do
		[ -f "$KLU_TOP/$f" ] && echo "$f"
	done
}

series() {
	grep -v -e '^#' -e '^[[:space:]]*$' "$KLU_TOP/patches/series" || true
}

assemble() {
	[ -f "$KLU_BASE/.klu-unpacked" ] || klu_die "no base tree in $KLU_BASE: run make setup"
	if [ ! -f "$KLU_SRC/.klu-copied" ]; then
		klu_log "copying the base tree to $KLU_SRC"
		rm -rf "$KLU_SRC" "$STATE"
		cp -a "$KLU_BASE" "$KLU_SRC"
		touch "$KLU_SRC/.klu-copied"
	fi

	local stage
	stage=$(mktemp -d)
	trap 'rm -rf "$stage"; trap - RETURN' RETURN

	# Base versions of every file a patch touches, then the patches.
	local p f
	for p in $(series); do
		[ -f "$KLU_TOP/patches/$p" ] || klu_die "patches/series names missing patch $p"
		for f in $(patch_targets "$KLU_TOP/patches/$p"); do
			if [ -f "$KLU_BASE/$f" ] && [ ! -e "$stage/$f" ]; then
				mkdir -p "$stage/$(dirname "$f")"
				cp --preserve=mode "$KLU_BASE/$f" "$stage/$f"
			fi
		done
	done
	for p in $(series); do
		patch -p1 -s -f -F0 --no-backup-if-mismatch -d "$stage" < "$KLU_TOP/patches/$p" ||
			klu_die "patch $p does not apply"
	done

	# The project's new files, which must not shadow upstream files.
	while read -r f; do
		if [ -e "$KLU_BASE/$f" ]; then
			klu_die "$f exists upstream: keep changes to it as a patch"
		fi
		mkdir -p "$stage/$(dirname "$f")"
		cp --preserve=mode "$KLU_TOP/$f" "$stage/$f"
	done < <(project_files)

	# Sync into the tree, rewriting only what differs.
	local new_state changed=0
	new_state=$(cd "$stage" && find . -type f | sed 's|^\./||' | sort)
	while read -r f; do
		[ -n "$f" ] || continue
		# cp over a file keeps its mode unless told: a mode change alone
		# counts too.
		if ! cmp -s "$stage/$f" "$KLU_SRC/$f" ||
		   [ "$(stat -c %a "$stage/$f")" != "$(stat -c %a "$KLU_SRC/$f")" ]; then
			mkdir -p "$KLU_SRC/$(dirname "$f")"
			cp --preserve=mode "$stage/$f" "$KLU_SRC/$f"
			changed=$((changed + 1))
		fi
	done <<< "$new_state"

	# Files assembled last time but not now go back to the base version.
	if [ -f "$STATE" ]; then
		while read -r f; do
			if [ -f "$KLU_BASE/$f" ]; then
				cmp -s "$KLU_BASE/$f" "$KLU_SRC/$f" ||
					cp --preserve=mode "$KLU_BASE/$f" "$KLU_SRC/$f"
			else
				rm -f "$KLU_SRC/$f"
			fi
			changed=$((changed + 1))
		done < <(comm -23 "$STATE" <(echo "$new_state"))
	fi
	echo "$new_state" > "$STATE"
	klu_log "assembled $KLU_SRC: $(echo "$new_state" | grep -c .) project files, $changed updated"
}

# The configuration fragments, as one text. The unpatched base gets them
# without the options that only the project's own Kconfig files define.
fragments() {
	if [ "$KLU_KERNEL" = base ]; then
		local own
		own=$(cd "$KLU_TOP" && git ls-files -- '*Kconfig*' | xargs -r sed -n 's/^config \([A-Z0-9_]*\).*/\1/p')
		(cd "$KLU_TOP" && cat "${KLU_FRAGMENTS[@]}") |
			grep -v -E "^(# )?CONFIG_($(echo $own | tr ' ' '|'))[= ]"
	else
		(cd "$KLU_TOP" && cat "${KLU_FRAGMENTS[@]}")
	fi
}

config_inputs_hash() {
	local kconfigs=""
	[ "$KLU_KERNEL" = base ] || kconfigs=$(grep -E '(^|/)Kconfig[^/]*$' "$STATE" || true)
	{
		local f
		fragments
		for f in $kconfigs; do cat "$KLU_SRC/$f"; done
	} | sha256sum | cut -d' ' -f1
}

config() {
	mkdir -p "$KLU_OBJ"
	local hash stamp=$KLU_OBJ/.klu-config-hash
	hash=$(config_inputs_hash)
	if [ -f "$KLU_OBJ/.config" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$hash" ]; then
		return 0
	fi
	klu_log "configuring $KLU_OBJ from ${KLU_FRAGMENTS[*]}"
	"${KLU_MAKE[@]}" -s rustavailable >/dev/null ||
		klu_die "Rust is not available to the kernel build: run make setup"
	fragments > "$KLU_OBJ/.config"
	if [ "$KLU_KERNEL" = guest ]; then
		mv "$KLU_OBJ/.config" "$KLU_OBJ/.config.fragment"
		KCONFIG_ALLCONFIG=$KLU_OBJ/.config.fragment "${KLU_MAKE[@]}" -s allnoconfig
	else
		"${KLU_MAKE[@]}" -s olddefconfig
	fi

	# Every option the fragment asks for must have survived.
	local line sym want bad=0
	while read -r line; do
		case "$line" in
		CONFIG_*=*) sym=${line%%=*}; want=$line ;;
		"# CONFIG_"*" is not set") sym=${line#\# }; sym=${sym%% *}; want=$line ;;
		*) continue ;;
		esac
		if ! grep -qxF "$want" "$KLU_OBJ/.config"; then
			echo "config: wanted '$want', got '$(grep -E "^$sym=|^# $sym is not set" "$KLU_OBJ/.config" || echo unset)'" >&2
			bad=1
		fi
	done < <(fragments)
	[ "$bad" = 0 ] || { rm -f "$KLU_OBJ/.config"; klu_die "kernel config is missing requested options"; }
	echo "$hash" > "$stamp"
	klu_log "config has every option of ${KLU_FRAGMENTS[*]}"
}

build() {
	klu_log "building the kernel in $KLU_OBJ"
	"${KLU_MAKE[@]}" -s bzImage
	# KVM's modules, which the test runner puts in the initramfs.
	if grep -q '^CONFIG_MODULES=y' "$KLU_OBJ/.config"; then
		"${KLU_MAKE[@]}" -s modules
	fi
	[ "$KLU_KERNEL" = guest ] || "${KLU_MAKE[@]}" -s headers_install >/dev/null
	klu_log "built $(make -s -C "$KLU_SRC" O="$KLU_OBJ" kernelrelease 2>/dev/null)"
}

# One assembly or build at a time per cache.
mkdir -p "$KLU_CACHE"
exec 8>"$KLU_CACHE/.kernel.lock"
flock 8

# The unpatched base is built as it is, without assembly.
assemble_tree() { [ "$KLU_KERNEL" = base ] || assemble; }

case "${1:-all}" in
assemble) assemble_tree ;;
config) assemble_tree; config ;;
build) build ;;
all) assemble_tree; config; build ;;
*) klu_die "usage: $0 [assemble|config|build|all]" ;;
esac
