#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-2.0
#
# Install everything the project needs on a fresh Debian bookworm machine.
# Idempotent: every step first checks whether its result is already there, so
# a second run takes a few seconds.
set -euo pipefail
. "$(dirname "$0")/common.sh"

APT_PACKAGES=(clang-19 lld-19 llvm-19 libclang-19-dev flex bison bc
	      libelf-dev libssl-dev cpio rsync dwarves kexec-tools
	      busybox-static make gcc git xz-utils patch systemd python3)
BACKPORT_PACKAGES=(qemu-system-x86)
TRIXIE_BACKPORT_PACKAGES=(linux-source-7.3 linux-config-7.3)
BINDGEN_VERSION=0.72.1

sudo_cmd() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

missing_packages() {
	local p
	for p in "$@"; do
		dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null |
			grep -q 'install ok installed' || echo "$p"
	done
}

# The mirror already configured for the machine's Debian suites: the project
# never names a registry host itself.
debian_mirror() {
	local uri
	uri=$(grep -hE '^\s*URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null |
	      awk '{print $2}' | grep -v -- '-security' | head -n1)
	if [ -z "$uri" ] && [ -f /etc/apt/sources.list ]; then
		uri=$(awk '$1 == "deb" && $0 !~ /security/ {
			for (i = 2; i <= NF; i++) if ($i ~ /:\/\//) { print $i; exit } }' \
			/etc/apt/sources.list)
	fi
	[ -n "$uri" ] || klu_die "cannot find the Debian mirror in the apt configuration"
	echo "$uri"
}

setup_apt() {
	local missing
	missing=$(missing_packages "${APT_PACKAGES[@]}" "${BACKPORT_PACKAGES[@]}" \
				   "${TRIXIE_BACKPORT_PACKAGES[@]}")
	[ -z "$missing" ] && return 0
	klu_log "installing packages: $(echo $missing)"

	local list=/etc/apt/sources.list.d/kvm-luo-backports.sources
	if [ ! -f "$list" ]; then
		local mirror
		mirror=$(debian_mirror)
		sudo_cmd tee "$list" >/dev/null <<-END
		Types: deb
		URIs: $mirror
		Suites: bookworm-backports trixie-backports
		Components: main
		Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
		END
	fi
	export DEBIAN_FRONTEND=noninteractive
	sudo_cmd apt-get update -q
	sudo_cmd apt-get install -y -q --no-install-recommends "${APT_PACKAGES[@]}"
	sudo_cmd apt-get install -y -q --no-install-recommends \
		-t bookworm-backports "${BACKPORT_PACKAGES[@]}"
	sudo_cmd apt-get install -y -q --no-install-recommends \
		"${TRIXIE_BACKPORT_PACKAGES[@]/%//trixie-backports}"
	missing=$(missing_packages "${APT_PACKAGES[@]}" "${BACKPORT_PACKAGES[@]}" \
				   "${TRIXIE_BACKPORT_PACKAGES[@]}")
	[ -z "$missing" ] || klu_die "packages still missing: $missing"
}

version_ge() { [ "$(printf '%s\n%s\n' "$2" "$1" | sort -V | head -n1)" = "$2" ]; }

setup_rust() {
	local sysroot
	sysroot=$(rustc --print sysroot)
	if [ ! -d "$sysroot/lib/rustlib/src/rust/library" ]; then
		klu_log "adding rust-src"
		rustup component add rust-src
	fi
	local tool
	for tool in rustfmt clippy-driver; do
		if ! command -v "$tool" >/dev/null || ! "$tool" --version >/dev/null 2>&1; then
			klu_log "adding rustfmt and clippy"
			rustup component add rustfmt clippy
			break
		fi
	done
	local have=""
	if command -v bindgen >/dev/null; then
		have=$(bindgen --version | awk '{print $2}')
	fi
	if [ -z "$have" ] || ! version_ge "$have" 0.71.1; then
		klu_log "installing bindgen-cli $BINDGEN_VERSION"
		cargo install --locked bindgen-cli --version "$BINDGEN_VERSION"
	fi
}

setup_base() {
	local stamp=$KLU_BASE/.klu-unpacked
	if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$(stat -c %Y "$KLU_BASE_TARBALL")" ]; then
		return 0
	fi
	klu_log "unpacking $KLU_BASE_TARBALL into $KLU_BASE"
	rm -rf "$KLU_BASE" "$KLU_SRC"
	mkdir -p "$KLU_BASE"
	tar -xf "$KLU_BASE_TARBALL" -C "$KLU_BASE" --strip-components=1
	stat -c %Y "$KLU_BASE_TARBALL" > "$stamp"
}

setup_apt
setup_rust
setup_base
klu_log "setup complete: base $(make -s -C "$KLU_BASE" kernelversion 2>/dev/null)"
