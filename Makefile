# vnet: everything a fresh Debian/Ubuntu machine (root) needs is installed here.
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV        ?= .venv
PY          := $(VENV)/bin/python
VNET        := $(VENV)/bin/vnet
PYTHON      ?= python3
BPF_SRC     := $(wildcard bpf/src/*.bpf.c)
BPF_OBJ     := $(patsubst bpf/src/%.bpf.c,bpf/build/%.bpf.o,$(BPF_SRC))
BPF_HDR     := $(wildcard bpf/src/*.h)
CLANG       ?= clang
LLVM_STRIP  ?= llvm-strip
ARCH        := $(shell uname -m | sed -e 's/x86_64/x86/' -e 's/aarch64/arm64/')
# Relative paths and no DWARF: the objects are byte-identical wherever they are built.
BPF_CFLAGS  := -g -O2 -target bpf -D__TARGET_ARCH_$(ARCH) -Wall -Werror \
               -fdebug-prefix-map=$(CURDIR)=. -Ibpf/src

# Debian package names: run time / build of the objects and tests (bpftool: the tests list what is attached).
RUN_PKGS    := libbpf1 libpcap0.8 libdeflate0 iproute2 python3-venv
BUILD_PKGS  := clang llvm libbpf-dev libpcap0.8-dev gcc tcpdump ethtool tshark bpftool
# `vnet demo ovs-congestion` and its tests run a private Open vSwitch (vnet/ovs.py): the programs only.
DEMO_PKGS   := openvswitch-switch
# tools/bench only: the C reference consumer of drain.py (gcc, libbpf-dev) and bpftrace for first_event.py.
BENCH_PKGS  := gcc libbpf-dev bpftrace

.PHONY: help deps sysdeps vm-deps bench-deps venv bpf check-bpf ffi vmlinux wheel demo test test-unit test-kernel test-vm clean

help:
	@echo "make demo      install what is missing, reproduce and explain the seed's latency problems (OVS congestion, CPU tail, also in a QEMU guest)"
	@echo "make test      install what is missing, run every test (check-bpf and the 6.1 VM suite included)"
	@echo "make test-vm   only the VM suite: kprobe/fentry/OVS datapath on Debian's 6.1 kernel under qemu"
	@echo "make bpf       compile bpf/src/*.bpf.c into bpf/build/ (committed)"
	@echo "make check-bpf fail when bpf/build/ differs from a rebuild of bpf/src/"
	@echo "make ffi       regenerate vnet/binding/_*_ffi.py (committed, pre-parsed cffi declarations) from _cdef.py"
	@echo "make bench-deps install what tools/bench/drain.py and first_event.py need (gcc, libbpf-dev, bpftrace)"
	@echo "make wheel     build dist/vnet-*.whl (objects inside, no compiler needed to install)"

# apt-get only what is missing; `apt-get update` once, only if something is.
# Services the packages bring (openvswitch-switch's ovsdb-server/ovs-vswitchd) are not started:
# a policy-rc.d that says "no" (exit 101) is in place during the install unless the machine has
# one already; invoke-rc.d (sysvinit) and deb-systemd-invoke (systemd) both obey it.
sysdeps:
	@missing=""; for p in $(RUN_PKGS) $(BUILD_PKGS) $(DEMO_PKGS); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  policy=""; \
	  if [ ! -e /usr/sbin/policy-rc.d ]; then \
	    printf '#!/bin/sh\n# vnet make sysdeps: no service starts while it installs packages\nexit 101\n' \
	      > /usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d && policy=1; \
	  fi; \
	  DEBIAN_FRONTEND=noninteractive apt-get update -q && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; rc=$$?; \
	  if [ -n "$$policy" ]; then rm -f /usr/sbin/policy-rc.d; fi; \
	  exit $$rc; \
	fi

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,analysis]'
	touch $@

venv: $(VENV)/.installed

deps: sysdeps venv

# The benchmarks' own tools (tools/bench/drain.py, first_event.py): not needed to run or test vnet.
bench-deps: deps
	@missing=""; for p in $(BENCH_PKGS); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  DEBIAN_FRONTEND=noninteractive apt-get update -q && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; \
	fi

# qemu, Debian's 6.1 kernel, busybox, Open vSwitch, virtme-ng (its own venv): only what is missing.
vm-deps:
	bash tools/vm/setup.sh

bpf/build/%.bpf.o: bpf/src/%.bpf.c $(BPF_HDR)
	@mkdir -p $(@D)
	$(CLANG) $(BPF_CFLAGS) -c $< -o $@
	$(LLVM_STRIP) -g $@

bpf: $(BPF_OBJ)

# Rebuild into a scratch folder and compare byte for byte.
check-bpf:
	@tmp=$$(mktemp -d); trap 'rm -rf $$tmp' EXIT; rc=0; \
	for src in $(BPF_SRC); do \
	  obj=$$(basename $$src .bpf.c).bpf.o; \
	  $(CLANG) $(BPF_CFLAGS) -c $$src -o $$tmp/$$obj && $(LLVM_STRIP) -g $$tmp/$$obj || exit 1; \
	  if ! cmp -s $$tmp/$$obj bpf/build/$$obj; then \
	    echo "check-bpf: bpf/build/$$obj differs from a rebuild of $$src (run 'make bpf' and commit)"; rc=1; \
	  fi; \
	done; \
	for obj in bpf/build/*.bpf.o; do \
	  [ -f bpf/src/$$(basename $$obj .bpf.o).bpf.c ] || { echo "check-bpf: $$obj has no source"; rc=1; }; \
	done; \
	[ $$rc = 0 ] && echo "check-bpf: $(words $(BPF_SRC)) objects match their sources"; exit $$rc

# cffi out-of-line ABI mode: the declarations of vnet/binding/_cdef.py parsed once, into committed
# pure-Python modules (no pycparser at run time); tests/unit/test_ffi_modules.py checks they are current.
ffi: venv
	$(PY) tools/gen_ffi.py

# vmlinux.h is generated once and committed; the build never reads this host's BTF.
vmlinux:
	bpftool btf dump file /sys/kernel/btf/vmlinux format c > bpf/src/vmlinux.h

wheel: venv
	rm -rf dist
	$(PY) -m build --wheel --outdir dist .

demo: deps vm-deps
	$(VNET) demo

# tests/vm run in a 6.1 guest booted once; each reports its guest result here.
test: deps vm-deps check-bpf
	$(PY) -m pytest -ra tests

test-vm: deps vm-deps
	$(PY) -m pytest -ra tests/vm

test-unit: venv
	$(PY) -m pytest -ra tests/unit

test-kernel: deps
	$(PY) -m pytest -ra tests/kernel

clean:
	rm -rf dist build $(VENV) .pytest_cache
