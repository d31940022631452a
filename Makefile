# overclone: build, test, install. `make help` lists the targets.

GO       ?= go
PREFIX   ?= /usr/local
BINDIR   ?= $(PREFIX)/bin
# What the tests run: containerd 1.6 and runc (e2e), mkfs.xfs and xfs_io,
# mkfs.btrfs, mkfs.ext4, chattr and filefrag (loop filesystems, durability,
# read-only roots), mount(8), and ca-certificates for the Go module proxy
# (dependencies, the containerd 2.x build). Under OVERCLONE_STRICT=1 (CI) a
# test missing any of them fails rather than skips.
DEB_PKGS := containerd runc xfsprogs btrfs-progs e2fsprogs attr mount ca-certificates

# Every directory under cmd/ is a binary.
BINARIES := $(notdir $(wildcard cmd/*))

.PHONY: all build test deps install run clean help

all: build

help:
	@echo "make build    build bin/containerd-overclone-grpc and bin/overclone"
	@echo "make deps     install the Debian packages the tests need (root)"
	@echo "make test     run every test (root: real mounts, loop devices)"
	@echo "make run      build and serve overclone with the default config (root)"
	@echo "make install  install binaries, systemd unit and default config"
	@echo "make demo     overclone and a private containerd: import, run, clean up"
	@echo "make e2e      only the end-to-end suite (containerd 1.6 and 2.x), verbose"
	@echo "make image    the DaemonSet's image as an OCI archive: $(IMAGE_ARCHIVE)"
	@echo "              ($(IMAGE); reproducible: same source and Go, same digest)"
	@echo "make containerd2  build containerd 2.x once into $(CONTAINERD2_CACHE)"
	@echo "make crictl   build crictl once into $(CRICTL_CACHE) (the CRI e2e test)"
	@echo "make runc     build runc >= 1.2 once into $(RUNC_CACHE) (the user-namespace e2e test)"
	@echo "make bench    overclone against containerd's built-in snapshotters (root, ~10 min;"
	@echo "              BENCHFLAGS=-quick for ~1 min); writes results/results.{md,json,svg}"

build: $(addprefix bin/,$(BINARIES))

bin/%: FORCE
	$(GO) build -o $@ ./cmd/$*

FORCE:

# deps installs only what is missing, so a second run costs nothing.
deps:
	@missing=""; for p in $(DEB_PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing:$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi
	$(GO) mod download

# The concurrency tests run once more under the race detector: a misused
# WaitGroup, for one, shows there on every run and in a plain run only
# once in a while.
RACE_TESTS := Concurrently|Meanwhile|GroupCommit

test: deps build
	$(GO) test -count=1 -timeout 30m ./...
	$(GO) test -race -count=1 -timeout 10m -run '$(RACE_TESTS)' ./snapshotter/

run: deps build
	./bin/containerd-overclone-grpc

install: build
	install -d $(DESTDIR)$(BINDIR)
	install -m 0755 $(addprefix bin/,$(BINARIES)) $(DESTDIR)$(BINDIR)/

clean:
	rm -rf bin

# --- the DaemonSet's image ---------------------------------------------------
# Both binaries, static, on an empty root, built by hack/nodeimage with no
# docker and no base image. VERSION is what the daemon's --version prints
# and the tag; the default, dev, is what deploy/kubernetes names. A release
# runs `make image VERSION=v1.2.3`.
VERSION       ?= dev
IMAGE         ?= ghcr.io/overclone/overclone:$(VERSION)
IMAGE_ARCHIVE ?= bin/overclone-image.tar

.PHONY: image
image:
	$(GO) run ./hack/nodeimage/cmd/overclone-image -out $(IMAGE_ARCHIVE) -name $(IMAGE) -version $(VERSION)

# --- containerd 2.x for the end-to-end tests -------------------------------
# Built once from the Go module proxy and cached outside the tree, so a second
# run (and CI with a persistent cache) does not rebuild it. The e2e tests find
# it through OVERCLONE_CONTAINERD2_BIN (default: this directory).
CONTAINERD2_VERSION ?= v2.4.2
CONTAINERD2_CACHE   ?= /var/cache/overclone/containerd-$(CONTAINERD2_VERSION)
CONTAINERD2_BIN     := $(CONTAINERD2_CACHE)/bin
CONTAINERD2_TOOLS   := containerd ctr containerd-shim-runc-v2

.PHONY: containerd2
containerd2: $(addprefix $(CONTAINERD2_BIN)/,$(CONTAINERD2_TOOLS))

$(CONTAINERD2_BIN)/%:
	@mkdir -p $(CONTAINERD2_BIN)
	cd /tmp && GOBIN=$(CONTAINERD2_BIN) GOFLAGS=-buildvcs=false $(GO) install \
		-tags "no_btrfs no_devmapper no_zfs" \
		github.com/containerd/containerd/v2/cmd/$*@$(CONTAINERD2_VERSION)

# --- crictl for the CRI end-to-end test ------------------------------------
# Built like containerd 2.x above, from the Go module proxy into a cache
# outside the tree; the CRI test (test/e2e TestCRI) finds it through
# OVERCLONE_CRICTL_BIN (default: this directory). Debian 12 packages no
# cri-tools.
CRICTL_VERSION ?= v1.37.0
CRICTL_CACHE   ?= /var/cache/overclone/crictl-$(CRICTL_VERSION)
CRICTL_BIN     := $(CRICTL_CACHE)/bin

.PHONY: crictl
crictl: $(CRICTL_BIN)/crictl

$(CRICTL_BIN)/crictl:
	@mkdir -p $(CRICTL_BIN)
	cd /tmp && GOBIN=$(CRICTL_BIN) GOFLAGS=-buildvcs=false $(GO) install \
		sigs.k8s.io/cri-tools/cmd/crictl@$(CRICTL_VERSION)

# --- runc >= 1.2 for the user-namespace end-to-end test ----------------------
# Debian 12 ships runc 1.1.5; containerd 2.x wants runc 1.2 or later for
# user-namespaced containers (idmapped mounts inside them). Built like
# containerd 2.x above, with cgo and libseccomp (Debian's libseccomp-dev,
# found through pkg-config), into a cache outside the tree; the test
# (test/e2e TestUserNamespace) finds it through OVERCLONE_RUNC_BIN (default:
# this directory).
RUNC_VERSION ?= v1.5.3
RUNC_CACHE   ?= /var/cache/overclone/runc-$(RUNC_VERSION)
RUNC_BIN     := $(RUNC_CACHE)/bin
DEB_PKGS     += libseccomp-dev pkg-config gcc libc6-dev

.PHONY: runc
runc: $(RUNC_BIN)/runc

$(RUNC_BIN)/runc:
	@mkdir -p $(RUNC_BIN)
	cd /tmp && GOBIN=$(RUNC_BIN) GOFLAGS=-buildvcs=false CGO_ENABLED=1 $(GO) install \
		-tags seccomp github.com/opencontainers/runc@$(RUNC_VERSION)

# --- end-to-end tests, demo, deploy files ------------------------------------
# The e2e suite (test/e2e) runs real containerd 1.6 (Debian) and 2.x (the
# cached build above) with runc, and a local docker-registry for pulls.
DEB_PKGS += docker-registry
SYSTEMDDIR ?= /etc/systemd/system
CONFDIR    ?= /etc/containerd-overclone

.PHONY: e2e demo install-deploy

# `make test` runs the e2e suite with the rest; it needs containerd 2.x,
# crictl and runc >= 1.2.
test: containerd2 crictl runc

# e2e runs only the end-to-end suite, verbosely, and prints the timings of
# overclone next to containerd's built-in overlayfs (also written to
# results/e2e-timings.txt).
e2e: deps build containerd2 crictl runc
	OVERCLONE_BIN=$(CURDIR)/bin/containerd-overclone-grpc OVERCLONE_CONTAINERD2_BIN=$(CONTAINERD2_BIN) \
		OVERCLONE_CRICTL_BIN=$(CRICTL_BIN) OVERCLONE_RUNC_BIN=$(RUNC_BIN) \
		$(GO) test -count=1 -timeout 15m -v ./test/e2e/

# demo starts overclone and a private containerd 1.6, imports the test image
# with --snapshotter overclone, runs a container that prints its view, and
# stops everything it started.
demo: deps build
	$(GO) run ./test/e2e/cmd/demo -overclone bin/containerd-overclone-grpc

# install also puts the systemd unit and the default config in place; an
# existing config is never overwritten.
install: install-deploy

install-deploy:
	install -d $(DESTDIR)$(SYSTEMDDIR) $(DESTDIR)$(CONFDIR)
	install -m 0644 deploy/systemd/containerd-overclone-grpc.service $(DESTDIR)$(SYSTEMDDIR)/
	@if [ -e $(DESTDIR)$(CONFDIR)/config.toml ]; then \
		echo "keeping existing $(DESTDIR)$(CONFDIR)/config.toml"; \
	else \
		install -m 0644 deploy/config.toml $(DESTDIR)$(CONFDIR)/config.toml; \
	fi
	@if [ -z "$(DESTDIR)" ] && command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then systemctl daemon-reload; fi

# bench runs every workload of test/bench on loop ext4 and xfs, overclone
# and containerd's built-in overlayfs and native snapshotters side by side.
BENCHFLAGS ?=
BENCHOUT   ?= results

.PHONY: bench
bench: deps
	$(GO) build -o bin/overclone-bench ./test/bench/cmd/overclone-bench
	./bin/overclone-bench -out $(BENCHOUT) -plot $(BENCHFLAGS)
