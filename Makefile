# qcow2fs: build, test, demo, bench, fixtures. GNU make.
#   make build     npm ci when node_modules is missing or older than package-lock.json, the
#                  native addons (node-gyp), then tsc
#   make test      installs what a fresh machine lacks, builds, runs every test (vitest)
#   make demo      mounts the demo image and shows what fdisk, file and debugfs read from it
#   make bench     qcow2fs against qemu-storage-daemon's FUSE export: reads (bench/run.sh), writes
#                  (bench/write.sh); the compressed copy of 1 GiB (mount -o compress) against
#                  qemu-img convert -c and qsd's compress filter, zlib and zstd (bench/compress.sh)
#   make fixtures  recreates the committed test images (needs qemu-img, qemu-io)
#   make fuzz      the fuzz test on many more mutated images (FUZZ_ITERATIONS, default 50000)
#   make soak      the soak test for SOAK_SECONDS (default 600)
#   make clean     removes build output and scratch files

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := build

NPM ?= npm
NPX ?= npx
# npm ci writes this file last, so its age is the age of the installed tree.
NODE_MODULES_STAMP := node_modules/.package-lock.json
CLI := dist/cli/main.js
# Tools the tests run; Debian packages that provide them.
TEST_TOOLS := qemu-img qemu-io qemu-storage-daemon fio fusermount
TEST_PACKAGES := qemu-utils qemu-system-common fio fuse

.PHONY: build test demo bench fixtures fuzz soak clean system-deps

# npm ci installs exactly the lock. Where the registry lacks some optional platform packages
# (rollup's), npm ci finds the lock "out of sync" although npm itself wrote it; then install
# the same lock with npm install --no-save, which leaves package-lock.json untouched.
$(NODE_MODULES_STAMP): package-lock.json
	$(NPM) ci || { echo "npm ci failed; installing the lock with npm install --no-save"; $(NPM) install --no-save; }
	@touch $@

# The native addons (binding.gyp: image locks, file holes, early writeback and read-ahead reads
# in lib/io/native/, QEMU's deflate and zstd in lib/engine/compress/native/): node-gyp
# (the one npm ships) builds them against the headers of the Node that runs it. Where that
# Node's prefix has include/node (a distribution's Node does), they are used from there, so
# nothing is downloaded.
ADDON := build/Release/ofd_lock.node
NODE_PREFIX := $(shell node -p 'require("path").resolve(process.execPath, "../..")')
NODE_GYP_FLAGS := $(if $(wildcard $(NODE_PREFIX)/include/node/node_api.h),--nodedir=$(NODE_PREFIX))

# node-gyp builds every target of binding.gyp, so one rule stands for all the addons.
$(ADDON): binding.gyp lib/io/native/ofd_lock.c lib/io/native/file_extents.c lib/io/native/file_writeback.c \
		lib/io/native/read_ahead.c lib/engine/compress/native/qemu_deflate.c lib/engine/compress/native/qemu_zstd.c \
		lib/engine/compress/native/napi_cluster.h
	$(NPM) run build:native -- $(NODE_GYP_FLAGS)

build: $(NODE_MODULES_STAMP) $(ADDON)
	$(NPX) tsc -p tsconfig.json
	chmod +x $(CLI)

# Installs the test tools with apt-get when one is missing and we are root; otherwise says
# which are missing (tests that need them then skip with a reason, or fail when CI=true).
system-deps:
	@missing=""; \
	for tool in $(TEST_TOOLS); do command -v $$tool >/dev/null 2>&1 || missing="$$missing $$tool"; done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	echo "missing:$$missing"; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get update; \
		apt-get install -y $(TEST_PACKAGES); \
	else \
		echo "not root or no apt-get: install $(TEST_PACKAGES) yourself; tests that need them will skip"; \
	fi

# The tests are type-checked too (vitest itself only strips types).
test: system-deps build
	$(NPX) tsc -p tsconfig.test.json
	$(NPX) vitest run

demo: build
	bash scripts/demo.sh

bench: build
	bash bench/run.sh
	bash bench/write.sh
	bash bench/compress.sh

# The fuzz test of make test (2,000 mutated images), longer: FUZZ_ITERATIONS images from
# FUZZ_SEED_START (default 1).
FUZZ_ITERATIONS ?= 50000
fuzz: build
	FUZZ_ITERATIONS=$(FUZZ_ITERATIONS) $(NPX) vitest run test/fuzz

# The soak test of make test (20 s), for SOAK_SECONDS (default 10 minutes).
SOAK_SECONDS ?= 600
soak: build
	SOAK_SECONDS=$(SOAK_SECONDS) $(NPX) vitest run test/soak

fixtures:
	bash fixtures/make-fixtures.sh

clean:
	rm -rf dist .tmp build
