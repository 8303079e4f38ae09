#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-2.0
#
# make lint: rustfmt, clippy and checkpatch over what the project wrote.
# Prints one result per check and, with -r FILE, appends "PASS|FAIL name
# seconds" lines to FILE. Exits non-zero if a check fails.
#
#   lint:rustfmt     rustfmt --check (kernel .rustfmt.toml) on the project's .rs
#                    in the kernel tree, rustfmt --check on the userspace crates
#   lint:clippy      the project's Rust objects built with CLIPPY=1, in a
#                    separate build directory; any warning in project code fails
#   lint:vmm-clippy  cargo clippy -D warnings on the userspace crates, the workspace
#                    tools/Cargo.toml: the Rust VMM (tools/kvm_luo_vmm), the
#                    /dev/liveupdate crate (tools/liveupdate), the agent's protocol
#                    (tools/kvm_luo_protocol), the agent (tools/kvm_luo_agent) and its
#                    tests (tools/testing/selftests/kvm_luo/fleet), their tests included
#   lint:checkpatch  scripts/checkpatch.pl on patches/*.patch and new C files
#   lint:kernel-doc  scripts/kernel-doc -Wall on the project's headers, and every
#                    DOC section and identifier a project .rst pulls in with a
#                    kernel-doc directive found in its file (no Sphinx here)
#   lint:systemd     systemd-analyze verify on the agent's units
#                    (tools/kvm_luo_agent/systemd), enabled in a root that has
#                    the system's units and stand-ins for the binaries they
#                    run, with the boot's default.target; any message fails
set -uo pipefail
. "$(dirname "$0")/common.sh"

results=""
[ "${1:-}" = -r ] && results=$2
CLIPPY_OBJ=$KLU_CACHE/clippy
failed=0

# The project's files at their kernel paths, filtered by a regex.
project_files() {
	git -C "$KLU_TOP" ls-files --cached --others --exclude-standard -- \
		"${KLU_KERNEL_DIRS[@]}" | grep -E "$1" || true
}

lint_rustfmt() {
	local t0=$SECONDS files
	files=$(project_files '\.rs$' | grep -v '^tools/')
	if [ -z "$files" ]; then
		klu_record PASS lint:rustfmt 0 "no project Rust files in the kernel tree yet"
		return
	fi
	if (cd "$KLU_TOP" && rustfmt --check --edition 2021 \
		--config-path "$KLU_SRC/.rustfmt.toml" $files &&
	    rustfmt --check --edition 2021 $(git ls-files --cached --others --exclude-standard -- "${KLU_CRATES[@]/%//*.rs}")); then
		klu_record PASS lint:rustfmt $((SECONDS - t0)) "$(echo "$files" | wc -l) files"
	else
		klu_record FAIL lint:rustfmt $((SECONDS - t0)) "run rustfmt on the files above"
	fi
}

lint_clippy() {
	local t0=$SECONDS files dirs f log=$KLU_CACHE/clippy.log
	files=$(project_files '\.rs$' | grep -v '^tools/')
	if [ -z "$files" ]; then
		klu_record PASS lint:clippy 0 "no project Rust files in the kernel tree yet"
		return
	fi
	mkdir -p "$CLIPPY_OBJ"
	if ! cmp -s "$KLU_OBJ/.config" "$CLIPPY_OBJ/.config"; then
		cp "$KLU_OBJ/.config" "$CLIPPY_OBJ/.config"
	fi
	# Rebuild the project's Rust objects so that their lints are printed
	# again: the kernel crate when the project adds to rust/kernel, and the
	# object of every other project directory.
	dirs=$(echo "$files" | xargs -n1 dirname | sort -u | grep -v '^rust/' || true)
	if echo "$files" | grep -q '^rust/'; then
		rm -f "$CLIPPY_OBJ/rust/kernel.o"
	fi
	for f in $dirs; do
		rm -f "$CLIPPY_OBJ/$f"/*.o
	done
	if ! make -C "$KLU_SRC" O="$CLIPPY_OBJ" LLVM=-19 ARCH=x86_64 -j"$(nproc)" \
		CLIPPY=1 -s olddefconfig prepare > "$log" 2>&1 ||
	   ! make -C "$KLU_SRC" O="$CLIPPY_OBJ" LLVM=-19 ARCH=x86_64 -j"$(nproc)" \
		CLIPPY=1 -s rust/ $(printf '%s/ ' $dirs) >> "$log" 2>&1; then
		tail -20 "$log"
		klu_record FAIL lint:clippy $((SECONDS - t0)) "build failed, log $log"
		return
	fi
	local hits
	hits=$(grep -E -- '--> ' "$log" | grep -F -f <(echo "$files") || true)
	if [ -n "$hits" ]; then
		grep -B8 -A6 -F -f <(echo "$files") "$log" | head -80
		klu_record FAIL lint:clippy $((SECONDS - t0)) "$(echo "$hits" | wc -l) warning(s), log $log"
	else
		klu_record PASS lint:clippy $((SECONDS - t0)) "$(echo "$files" | wc -l) files"
	fi
}

lint_vmm_clippy() {
	local t0=$SECONDS crate bad=0
	# One workspace (tools/Cargo.toml), one lockfile.
	CARGO_TARGET_DIR="$KLU_CACHE/vmm-clippy" cargo clippy -q --locked --workspace --all-targets \
		--manifest-path "$KLU_TOP/tools/Cargo.toml" -- -D warnings || bad=1
	if [ "$bad" = 0 ]; then
		klu_record PASS lint:vmm-clippy $((SECONDS - t0)) "the workspace tools/Cargo.toml"
	else
		klu_record FAIL lint:vmm-clippy $((SECONDS - t0)) "see the warnings above"
	fi
}

lint_systemd() {
	local t0=$SECONDS root units out bin unit target
	units=$(cd "$KLU_TOP/tools/kvm_luo_agent/systemd" && echo *.service)
	root=$(mktemp -d)
	mkdir -p "$root/usr/lib/systemd" "$root/etc/systemd/system" "$root/usr/sbin" "$root/usr/bin"
	cp -a /usr/lib/systemd/system "$root/usr/lib/systemd/"
	(cd "$KLU_TOP/tools/kvm_luo_agent/systemd" && cp $units "$root/etc/systemd/system/")
	# What the units run, as verify wants it: executables at their paths.
	for bin in $(sed -n 's/^ExecStart=\([^ ]*\).*/\1/p' "$root"/etc/systemd/system/*.service) \
		/usr/bin/sleep; do
		[ -e "$root$bin" ] || cp /bin/true "$root$bin"
	done
	# Enabled as an operator would, so that the boot transaction (ordering
	# cycles with the system's units) is checked too.
	for unit in $units; do
		for target in $(sed -n 's/^WantedBy=//p' "$root/etc/systemd/system/$unit"); do
			mkdir -p "$root/etc/systemd/system/$target.wants"
			ln -s "../$unit" "$root/etc/systemd/system/$target.wants/$unit"
		done
	done
	out=$(systemd-analyze verify --root="$root" $units default.target 2>&1)
	local rc=$?
	rm -rf "$root"
	if [ "$rc" = 0 ] && [ -z "$out" ]; then
		klu_record PASS lint:systemd $((SECONDS - t0)) "$units"
	else
		echo "$out"
		klu_record FAIL lint:systemd $((SECONDS - t0)) "systemd-analyze verify: see above"
	fi
}

lint_checkpatch() {
	local t0=$SECONDS patches cfiles out bad=0
	patches=$(grep -v -e '^#' -e '^[[:space:]]*$' "$KLU_TOP/patches/series" |
		  sed "s|^|$KLU_TOP/patches/|")
	cfiles=$(project_files '\.(c|h)$' | sed "s|^|$KLU_TOP/|")
	if [ -n "$patches" ]; then
		out=$(cd "$KLU_SRC" && scripts/checkpatch.pl -q --no-summary $patches 2>&1) || bad=1
		[ -z "$out" ] || echo "$out"
	fi
	if [ -n "$cfiles" ]; then
		out=$(cd "$KLU_SRC" && scripts/checkpatch.pl -q --no-summary -f $cfiles 2>&1) || bad=1
		[ -z "$out" ] || echo "$out"
	fi
	local n=$(( $(echo "$patches" | grep -c .) + $(echo "$cfiles" | grep -c .) ))
	if [ "$bad" = 0 ]; then
		klu_record PASS lint:checkpatch $((SECONDS - t0)) "$n files"
	else
		klu_record FAIL lint:checkpatch $((SECONDS - t0)) "see the report above"
	fi
}

# Prints what a project .rst pulls in with kernel-doc directives, one
# "FILE doc|id NAME" line each.
kernel_doc_refs() {	# kernel_doc_refs RST
	awk '/^\.\. kernel-doc::/ { file = $3; next }
	     file && /^ +:doc: / { sub(/^ +:doc: +/, ""); print file, "doc", $0; next }
	     file && /^ +:identifiers: / {
		sub(/^ +:identifiers: +/, ""); n = split($0, ids, / +/)
		for (i = 1; i <= n; i++) print file, "id", ids[i]; next }
	     !/^ +:/ { file = "" }' "$1"
}

lint_kernel_doc() {
	local t0=$SECONDS headers out rst file kind name bad=0 n=0
	headers=$(project_files '\.h$')
	if [ -n "$headers" ]; then
		out=$(cd "$KLU_SRC" && scripts/kernel-doc -none -Wall $headers 2>&1)
		[ -z "$out" ] || { echo "$out"; bad=1; }
	fi
	for rst in $(project_files '\.rst$'); do
		while read -r file kind name; do
			n=$((n + 1))
			out=$(cd "$KLU_SRC" && scripts/kernel-doc -rst -function "$name" "$file" 2>&1)
			if [ "$kind" = id ]; then
				echo "$out" | grep -qE "^\.\. c:[a-z]+:: ([a-z]+ )?$name\b" && continue
			else
				echo "$out" | grep -q '[[:alnum:]]' && continue
			fi
			echo "$rst: $file has no kernel-doc for $kind \"$name\""
			bad=1
		done < <(kernel_doc_refs "$KLU_TOP/$rst")
	done
	if [ "$bad" = 0 ]; then
		klu_record PASS lint:kernel-doc $((SECONDS - t0)) "$(echo "$headers" | grep -c .) headers, $n references"
	else
		klu_record FAIL lint:kernel-doc $((SECONDS - t0)) "see the report above"
	fi
}

[ -d "$KLU_SRC" ] && [ -f "$KLU_OBJ/.config" ] || klu_die "build the kernel first (make kernel)"
lint_rustfmt
lint_clippy
lint_vmm_clippy
lint_checkpatch
lint_kernel_doc
lint_systemd
exit "$failed"
