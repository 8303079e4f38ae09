# SPDX-License-Identifier: GPL-2.0
#
# KVM live update in Rust: entry points. See README.md.
#
#   make check   setup if needed, build, lint, run every test in QEMU
#   make demo    a Rust VMM keeps its guest running across a host live update
#                (FLEET=1: three VMs under the live-update agent)
#   make setup   install packages, Rust components and the base tree
#   make kernel  assemble the tree and build the debug kernel the tests run on
#   make kernel-release  the same tree without debug options, for demo and bench
#   make kernel-guest  a small kernel of the same tree for the demo's Linux guest
#   make test    run the QEMU tests of tests.list (T=name runs one; J=2 runs
#                two QEMU machines at once, as make check does)
#   make test-nested  the tests with nested Linux guests, on one CPU (T=name runs one)
#   make lint    rustfmt, clippy and checkpatch over the project's code
#   make bench   guest_memfd against memfd preservation (not part of check)
#   make soak    boot the nested Linux guest N times and count the outcomes
#                (N=20 KERNEL=release|debug|base CPUS=1 MODE=boot|update
#                VMM="--vcpus 1 ..."; build/soak.sh -h)
#   make clean   remove the kernel build (the base tree and packages stay)

SHELL := /bin/bash
export KLU_CACHE ?= $(HOME)/.cache/kvm-luo
SELFTESTS := tools/testing/selftests/kvm_luo
RUNNER_ARGS = -s $(KLU_CACHE)/src -b $(KLU_CACHE)/build -o $(KLU_CACHE)/out \
	-g $(KLU_CACHE)/build-guest $(foreach t,$(T),-t $(t)) $(if $(J),-j $(J))

.PHONY: check demo setup kernel kernel-release kernel-guest kernel-base test test-nested lint \
	bench soak series series-check clean

check:
	@build/check.sh

demo: kernel-release kernel-guest
	@KLU_KERNEL=release FLEET="$(FLEET)" DEMO="$(DEMO)" build/demo.sh

setup:
	@build/setup.sh

kernel: setup
	@build/kernel.sh all

kernel-release: setup
	@KLU_KERNEL=release build/kernel.sh all

kernel-guest: setup
	@KLU_KERNEL=guest build/kernel.sh all

kernel-base: setup
	@KLU_KERNEL=base build/kernel.sh all

test:
	@$(SELFTESTS)/run_vmtests.sh $(RUNNER_ARGS)

test-nested:
	@$(SELFTESTS)/run_vmtests.sh $(RUNNER_ARGS) -l $(SELFTESTS)/nested.list -c 1

lint:
	@build/lint.sh

series: setup
	@build/series.sh export

series-check: setup
	@build/series.sh check

bench: kernel-release
	@KLU_KERNEL=release build/bench.sh

N ?= 20
KERNEL ?= release
CPUS ?= 1
MODE ?= boot
soak: setup
	@build/soak.sh -n $(N) -k $(KERNEL) -c $(CPUS) -m $(MODE) $(if $(JOBS),-j $(JOBS)) \
		$(if $(QEMU),-q) $(if $(VMM),-- $(VMM))

clean:
	rm -rf $(KLU_CACHE)/build $(KLU_CACHE)/build-release $(KLU_CACHE)/build-guest \
		$(KLU_CACHE)/clippy \
		$(KLU_CACHE)/vmm-clippy $(KLU_CACHE)/cargo-test $(KLU_CACHE)/out $(KLU_CACHE)/out-release \
		$(KLU_CACHE)/build-base $(KLU_CACHE)/out-soak $(KLU_CACHE)/cfg \
		$(KLU_CACHE)/series-tree $(KLU_CACHE)/series-git series
