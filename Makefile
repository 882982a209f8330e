# portkit build, test and install.
#
#   make build     every binary whose package exists, into bin/
#   make test      deps, then all tests (unit + integration), short fuzz runs, bench smoke run
#   make lint      gofmt, go vet, staticcheck
#   make bench     side-by-side performance table (bench-results/)
#   make demo      build, then scripts/demo.sh
#   make install   PREFIX=/usr/local CNI_BIN_DIR=/opt/cni/bin OCI_HOOKS_DIR=/etc/containers/oci/hooks.d
#   make deps      Debian packages (as root) and the lint tools

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := build

GO ?= go
PREFIX ?= /usr/local
BINDIR ?= $(PREFIX)/bin
CNI_BIN_DIR ?= /opt/cni/bin
# Podman and CRI-O read admin hooks from here (packaged ones from /usr/share/containers/oci/hooks.d).
OCI_HOOKS_DIR ?= /etc/containers/oci/hooks.d
DESTDIR ?=

# Tools live outside the repository so go.mod stays about portkit only.
TOOLS_DIR ?= $(HOME)/.cache/portkit-tools
STATICCHECK_VERSION ?= v0.8.2
STATICCHECK := $(TOOLS_DIR)/staticcheck-$(STATICCHECK_VERSION)

TEST_TIMEOUT ?= 20m
# Packages tested with the race detector (the concurrent library); the rest
# run without it, so the whole run fits CI's time budget on 2 cores.
RACE_PKGS ?= ./libport/...
GOTESTFLAGS ?=
FUZZTIME ?= 10s
TEST_LOG ?= $(CURDIR)/bin/go-test.log

# Binary name = last path element of its package directory.
PKG_DIRS := cmd/portkit plugins/usernet plugins/portdriver hooks/portkit-oci-hook
PRESENT := $(foreach d,$(PKG_DIRS),$(if $(wildcard $(d)/*.go),$(d)))
BINARIES := $(notdir $(PRESENT))

.PHONY: all build test test-go fuzz bench-quick lint bench demo install uninstall \
	install-rootlesskit-compat deps deps-system tools clean

all: build

build:
ifeq ($(strip $(PRESENT)),)
	@echo "build: no binary packages yet (looked for $(PKG_DIRS))"
else
	@mkdir -p bin
	$(GO) build -o bin/ $(addprefix ./,$(PRESENT))
	@echo "built: $(addprefix bin/,$(BINARIES))"
endif

# ---- tests ------------------------------------------------------------------

test: deps-system build test-go fuzz bench-quick

# One go test run, as JSON through scripts/gotestreport: it prints go test's
# usual ok/FAIL lines, the output of failing tests, and every skip with its
# reason (CI installs everything, so a skip there is a bug to look at).
test-go:
	GO=$(GO) TEST_TIMEOUT=$(TEST_TIMEOUT) RACE_PKGS='$(RACE_PKGS)' GOTESTFLAGS='$(GOTESTFLAGS)' TEST_LOG=$(TEST_LOG) scripts/gotest.sh

# Every Fuzz target (found with go test -list, so new ones join by themselves), briefly.
fuzz:
	FUZZTIME=$(FUZZTIME) GO=$(GO) scripts/fuzz.sh

# The bench harness in its one-minute smoke mode, so it never rots.
bench-quick: build
	@if [ -d integration/bench ]; then \
	  $(GO) build -o bin/portkit-bench ./integration/bench && \
	  BENCH_QUICK=1 bin/portkit-bench -out bench-results/quick; \
	else echo "bench-quick: integration/bench not there yet"; fi

# ---- lint -------------------------------------------------------------------

lint: tools
	@out="$$(gofmt -l $$(git ls-files -co --exclude-standard '*.go'))"; \
	if [ -n "$$out" ]; then echo "gofmt: these files need gofmt -w:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...
	$(STATICCHECK) ./...
	@echo "lint: clean"

# ---- bench and demo ---------------------------------------------------------

bench: deps-system build
	$(GO) build -o bin/portkit-bench ./integration/bench
	bin/portkit-bench -out bench-results

demo: deps-system build
	@test -x scripts/demo.sh || { echo "demo: scripts/demo.sh is not there yet"; exit 1; }
	scripts/demo.sh

# ---- install ----------------------------------------------------------------

install: build
	install -d $(DESTDIR)$(BINDIR) $(DESTDIR)$(CNI_BIN_DIR)
	@for b in portkit portkit-oci-hook; do \
	  if [ -f bin/$$b ]; then echo "install bin/$$b -> $(DESTDIR)$(BINDIR)/$$b"; install -m 0755 bin/$$b $(DESTDIR)$(BINDIR)/$$b; fi; \
	done
	@for b in usernet portdriver; do \
	  if [ -f bin/$$b ]; then echo "install bin/$$b -> $(DESTDIR)$(CNI_BIN_DIR)/$$b"; install -m 0755 bin/$$b $(DESTDIR)$(CNI_BIN_DIR)/$$b; fi; \
	done
	@# oci-hooks JSON files name the hook binary as @BINDIR@/portkit-oci-hook.
	@for j in $(wildcard hooks/portkit-oci-hook/hooks.d/*.json); do \
	  install -d $(DESTDIR)$(OCI_HOOKS_DIR); \
	  echo "install $$j -> $(DESTDIR)$(OCI_HOOKS_DIR)/$$(basename $$j)"; \
	  sed 's|@BINDIR@|$(BINDIR)|g' $$j > $(DESTDIR)$(OCI_HOOKS_DIR)/$$(basename $$j); \
	  chmod 0644 $(DESTDIR)$(OCI_HOOKS_DIR)/$$(basename $$j); \
	done

uninstall:
	rm -f $(DESTDIR)$(BINDIR)/portkit $(DESTDIR)$(BINDIR)/portkit-oci-hook \
	  $(DESTDIR)$(CNI_BIN_DIR)/usernet $(DESTDIR)$(CNI_BIN_DIR)/portdriver
	@for j in $(wildcard hooks/portkit-oci-hook/hooks.d/*.json); do rm -f $(DESTDIR)$(OCI_HOOKS_DIR)/$$(basename $$j); done

# `portkit run` answers to the name rootlesskit: a symlink in a directory the
# user names, never over a real RootlessKit.
install-rootlesskit-compat:
	@test -n "$(ROOTLESSKIT_COMPAT_DIR)" || { echo "install-rootlesskit-compat: set ROOTLESSKIT_COMPAT_DIR=DIR (a directory you put first on PATH)"; exit 1; }
	@test -x $(BINDIR)/portkit || { echo "install-rootlesskit-compat: $(BINDIR)/portkit is missing: run make install first"; exit 1; }
	@link=$(ROOTLESSKIT_COMPAT_DIR)/rootlesskit; \
	if [ -e "$$link" ] && [ "$$(readlink "$$link")" != "$(BINDIR)/portkit" ]; then \
	  echo "install-rootlesskit-compat: $$link exists and is not our symlink; refusing to overwrite it"; exit 1; fi; \
	install -d $(ROOTLESSKIT_COMPAT_DIR) && ln -sfn $(BINDIR)/portkit "$$link" && echo "$$link -> $(BINDIR)/portkit"

# ---- dependencies -----------------------------------------------------------

deps: deps-system tools

deps-system:
	@scripts/deps.sh
	@TOOLS_DIR=$(TOOLS_DIR) GO=$(GO) scripts/engines-deps.sh

tools: $(STATICCHECK)

# The module proxy here refuses version listing, so `go install pkg@version`
# can fail; download the exact module version and build inside it instead.
$(STATICCHECK):
	@mkdir -p $(TOOLS_DIR)
	@dir="$$($(GO) mod download -json honnef.co/go/tools@$(STATICCHECK_VERSION) | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$$/\1/p')"; \
	test -n "$$dir" || { echo "tools: go mod download honnef.co/go/tools@$(STATICCHECK_VERSION) failed"; exit 1; }; \
	echo "tools: building staticcheck $(STATICCHECK_VERSION) into $@"; \
	cd "$$dir" && $(GO) build -o $@.tmp ./cmd/staticcheck && mv $@.tmp $@

clean:
	rm -rf bin
