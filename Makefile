# overclone: build, test, install. `make help` lists the targets.

GO       ?= go
PREFIX   ?= /usr/local
BINDIR   ?= $(PREFIX)/bin
DEB_PKGS := containerd runc xfsprogs btrfs-progs e2fsprogs attr

# Every directory under cmd/ is a binary.
BINARIES := $(notdir $(wildcard cmd/*))

.PHONY: all build test deps install run clean help

all: build

help:
	@echo "make build    build bin/containerd-overclone-grpc and bin/overclone"
	@echo "make deps     install the Debian packages the tests need (root)"
	@echo "make test     run every test (root: real mounts, loop devices)"
	@echo "make run      build and serve overclone with the default config (root)"
	@echo "make install  install the binaries"

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

test: deps build
	$(GO) test -count=1 -timeout 20m ./...

run: deps build
	./bin/containerd-overclone-grpc

install: build
	install -d $(DESTDIR)$(BINDIR)
	install -m 0755 $(addprefix bin/,$(BINARIES)) $(DESTDIR)$(BINDIR)/

clean:
	rm -rf bin
