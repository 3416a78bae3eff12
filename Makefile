# skiff — build, test and run. `make test` is what CI runs (.ci/run).
SHELL := /bin/bash
.DEFAULT_GOAL := build

CARGO ?= cargo
DATA_DIR ?= /var/lib/skiff
# Debian packages that building and testing need (the machine reaches Debian's mirrors only).
DEB_PACKAGES := dnsmasq-base protobuf-compiler libprotobuf-dev pkg-config libseccomp-dev etcd-server etcd-client umoci skopeo \
	busybox-static nftables iproute2 docker-registry runc crun containerd containernetworking-plugins \
	dnsperf wrk hyperfine jq binutils curl python3-venv
# The official Python client for the e2e tests lives in a venv of the build dir (Debian's Python
# is externally managed); the tests find it through SKIFF_E2E_PYTHON.
PYVENV := $(CURDIR)/build/pyvenv
export SKIFF_E2E_PYTHON := $(PYVENV)/bin/python3
export PATH := $(HOME)/.cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

.PHONY: deps build release lint fmt images test bench bench-store bench-runtime bench-net bench-api bench-proxy bench-dns bench-pods bench-scheduler run clean

## deps: install the Debian packages and cargo tools the build and tests need (idempotent, quiet)
deps:
	@missing=$$(for p in $(DEB_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "deps: installing $$missing"; \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get update -qq >/dev/null && apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi
	@$(PYVENV)/bin/python3 -c 'import kubernetes' 2>/dev/null || { echo "deps: installing the python kubernetes client into $(PYVENV)"; \
		/usr/bin/python3 -m venv $(PYVENV) && $(PYVENV)/bin/pip install -q kubernetes; }
	@command -v cargo-nextest >/dev/null || { echo "deps: installing cargo-nextest"; $(CARGO) install --locked -q cargo-nextest; }

build:
	$(CARGO) build --workspace --bins

release:
	$(CARGO) build --release -p skiff

fmt:
	$(CARGO) fmt --all

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings

## images: OCI image archives for tests and the lab (build/images/*.tar)
images:
	@if [ -x images/build.sh ]; then images/build.sh build/images; else echo "images: no recipes yet"; fi

## test: everything CI checks. Root-only tests (namespaces, cgroups, mounts) run too: CI is root.
# Incremental caches are several GB and useless on a clean CI clone.
test: export CARGO_INCREMENTAL := 0
test: deps lint images
	# the e2e harness builds `skiff` alone (its features differ from the workspace build): do it once, up front
	$(CARGO) build --locked -p skiff
	$(CARGO) nextest run --workspace --locked --no-fail-fast --run-ignored all

bench: bench-store bench-runtime bench-net bench-api bench-proxy bench-dns bench-pods bench-scheduler

## bench-store: redb vs a real etcd (writes/s at 1/16/64 writers, reads/s, watch latency)
bench-store: deps
	$(CARGO) run --profile bench-fast -p skiff-bench -- store --duration-secs 5

## bench-runtime: create+start+wait+delete of /bin/true, skiff (shim included) vs runc on one bundle
bench-runtime: deps images
	$(CARGO) build --profile bench-fast -p skiff --bin skiff
	$(CARGO) build --profile bench-fast -p skiff-runtime --example bench-runtime
	./$${CARGO_TARGET_DIR:-target}/bench-fast/examples/bench-runtime "$$(realpath $${CARGO_TARGET_DIR:-target})/bench-fast/skiff shim" 50

## bench-net: pod attach time (veth + IPAM) and nft apply time for 1,000 services x 10 endpoints
bench-net: deps
	$(CARGO) nextest run -p skiff-net --run-ignored all --no-capture -E 'test(attach_detach_cycles) | test(thousand_services)'

## bench-api: API latency at 100/500 writes/s (16 clients), list of 10,000 ConfigMaps, 100 watchers, RSS
bench-api: deps
	$(CARGO) build --profile bench-fast -p skiff --bin skiff
	$(CARGO) run --profile bench-fast -p skiff-bench -- api

## run: a single-node cluster in the foreground (from issue #3 on)
run: deps release
	./target/release/skiff server --data-dir $(DATA_DIR)

clean:
	$(CARGO) clean
	rm -rf build

## bench-proxy: service proxy rule sync (build + render) for 1,000 Services x 10 endpoints
bench-proxy: deps
	$(CARGO) bench -p skiff-proxy --bench rule_sync

## bench-dns: skiff-dns vs dnsmasq with dnsperf, same records, same run
bench-dns: deps
	$(CARGO) build --release -p skiff-dns --example bench_server
	BIN=$${CARGO_TARGET_DIR:-target}/release/examples/bench_server sh crates/dns/bench/dnsperf.sh

## bench-scheduler: 1,000 hollow nodes, 10,000 pods against a real skiff server: pods/s, create->bound p99, RSS
bench-scheduler: deps
	$(CARGO) build --profile bench-fast -p skiff --bin skiff
	$(CARGO) build --profile bench-fast -p skiff-bench
	./$${CARGO_TARGET_DIR:-target}/bench-fast/skiff-bench scheduler --skiff $${CARGO_TARGET_DIR:-target}/bench-fast/skiff

## bench-pods: a 100-replica Deployment on one real node, per-pod start-up p50/p99, RSS
bench-pods: deps images
	$(CARGO) build --profile bench-fast -p skiff --bin skiff
	$(CARGO) build --profile bench-fast -p skiff-bench
	./$${CARGO_TARGET_DIR:-target}/bench-fast/skiff-bench pods --skiff $${CARGO_TARGET_DIR:-target}/bench-fast/skiff --image-tar build/images/busybox.tar
