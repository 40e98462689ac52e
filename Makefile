# aipbx-appliance — run as root on Debian 12. Every target installs what it needs.
SHELL := /bin/bash
PY := /usr/bin/python3
VENV := build/venv
VPY := $(VENV)/bin/python
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
DEB := build/aipbx-appliance_$(VERSION)_all.deb

.PHONY: help prereqs venv lint typecheck unit integration system test deb lintian piuparts demo bench bench-upgrade bench-bluegreen bench-watchdog bench-tls clean sample realapp realapp-frontend

help:
	@echo "make demo   build the .deb, boot Debian 12 under systemd-nspawn, install, set up"
	@echo "make test   ruff, mypy, unit, integration and system tests"
	@echo "make deb    build $(DEB)"

prereqs: build/.prereqs
build/.prereqs: packaging/host-packages.txt
	mkdir -p build
	apt-get update -q -o DPkg::Lock::Timeout=600
	DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends -o DPkg::Lock::Timeout=600 \
	  $$(grep -v '^#' packaging/host-packages.txt)
	touch $@

venv: $(VENV)/.done
$(VENV)/.done: build/.prereqs packaging/dev-requirements.txt
	$(PY) -m venv --system-site-packages $(VENV)
	$(VPY) -m pip install -q -r packaging/dev-requirements.txt
	touch $@

lint: venv
	$(VENV)/bin/ruff check appliance tests bench sample_backend
	$(VENV)/bin/ruff format --check appliance tests bench sample_backend

typecheck: venv
	$(VENV)/bin/mypy

# pytest exits 5 when it collected nothing: that is a failure here, never a pass.
PYTEST = packaging/pytest-tier $(VPY)

unit: venv
	$(PYTEST) tests/unit

integration: venv
	$(PYTEST) tests/integration

# The sample backend (DESIGN.md), built into two releases for tests, bench and demo.
SAMPLE := build/sample/aipbx-sample-1.0.0.tar.gz build/sample/aipbx-sample-2.0.0.tar.gz
sample: $(SAMPLE)
build/sample/aipbx-sample-%.tar.gz: $(wildcard sample_backend/aipbx_sample/*.py) sample_backend/aipbx-release.toml.in sample_backend/build.sh $(wildcard appliance/release/*.py)
	rm -rf build/sample/aipbx-sample-$* build/sample/aipbx-sample-$*.tar.gz*
	bash sample_backend/build.sh build/sample $*

# The real aiPBX backend (../shared/realapp, test data): built with npm the way its
# Dockerfile builds its production tree (cached under build/cache/realapp, keyed by the
# tarball and the recipe), then packed into two releases with `aipbxctl release pack`.
REALAPP_SRC ?= $(CURDIR)/../shared/realapp
REALAPP := build/realapp
realapp: venv
	@tarball=$$(ls $(REALAPP_SRC)/aiPBX_backend-*.tar.gz 2>/dev/null | head -1); \
	if [ -z "$$tarball" ]; then echo "realapp: no aiPBX_backend-*.tar.gz in $(REALAPP_SRC)" >&2; exit 1; fi; \
	command -v npm >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends npm; \
	app=$$(tests/realapp/build-backend.sh "$$tarball" build/cache/realapp) && \
	PYTHON=$(CURDIR)/$(VPY) tests/realapp/pack-backend.sh "$$app" $(REALAPP)

# The real aiPBX frontend (../shared/realapp/aiPBX-*.tar.gz, React + webpack): built twice
# with npm, release N and N+1 (one lazily loaded chunk changed), its prerender run by
# Debian's chromium (cached under build/cache/realapp like the backend), then packed into
# two frontend releases under build/realapp/frontend. The browser tests use the same chromium.
realapp-frontend: venv
	@tarball=$$(ls $(REALAPP_SRC)/aiPBX-*.tar.gz 2>/dev/null | head -1); \
	if [ -z "$$tarball" ]; then echo "realapp-frontend: no aiPBX-*.tar.gz in $(REALAPP_SRC)" >&2; exit 1; fi; \
	command -v npm >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends npm; \
	builds=$$(tests/realapp/build-frontend.sh "$$tarball" build/cache/realapp) && \
	PYTHON=$(CURDIR)/$(VPY) tests/realapp/pack-frontend.sh "$$builds" $(REALAPP)/frontend

SYSTEM_ENV = AIPBX_DEB=$(CURDIR)/$(DEB) AIPBX_SAMPLE_DIR=$(CURDIR)/build/sample AIPBX_REALAPP_DIR=$(CURDIR)/$(REALAPP)
system: venv deb sample realapp realapp-frontend
	$(SYSTEM_ENV) $(PYTEST) tests/system -x

test: lint typecheck unit integration lintian piuparts system

deb: $(DEB)
$(DEB): build/.prereqs $(shell git ls-files appliance bin units nginx packaging man pyproject.toml 2>/dev/null)
	bash packaging/build-deb.sh

lintian: deb
	bash packaging/lintian.sh $(DEB)

piuparts: deb
	bash packaging/piuparts.sh $(DEB)

# APP=real: the same demo with the real aiPBX backend (make realapp).
# LOAD_SHARE: the shares of the sustainable rate (measured first, in the same run) that the
# demo and bench-upgrade load; the first is the headline. Exit 1: CLAIM FAILED, 3: OVERLOADED.
APP ?= sample
LOAD_SHARE ?= 0.5,0.8
demo: venv deb sample $(if $(filter real,$(APP)),realapp)
	$(SYSTEM_ENV) APP=$(APP) LOAD_SHARE=$(LOAD_SHARE) $(VPY) -m bench.demo

bench: bench-upgrade bench-watchdog bench-backup bench-tls

# The blue/green upgrade beside a no-switch baseline and a naive restart, the load sized to
# the machine: build/bench/upgrade.json.
bench-upgrade: venv deb sample
	AIPBX_DEB=$(CURDIR)/$(DEB) AIPBX_SAMPLE_DIR=$(CURDIR)/build/sample $(VPY) -m bench.upgrade --share $(LOAD_SHARE)
bench-bluegreen: bench-upgrade

# The watchdog's recovery times, crash-loop cost and footprint: build/bench/watchdog.json.
bench-watchdog: venv deb sample
	AIPBX_DEB=$(CURDIR)/$(DEB) AIPBX_SAMPLE_DIR=$(CURDIR)/build/sample $(VPY) -m bench.watchdog

# TLS handshakes with a static vs a variable certificate path, and a renewal under keep-alive
# load (nginx -s reload vs fullchain.pem renamed over), on this host's nginx: build/bench/tls.json.
bench-tls: venv
	$(VPY) -m bench.tls

clean:
	rm -rf build/src build/*.deb build/venv

# `aipbxctl backup` beside a plain pg_dump -Fc of a >= 1 GB database: build/bench/backup.json.
.PHONY: bench-backup
bench-backup: venv deb
	AIPBX_DEB=$(CURDIR)/$(DEB) $(VPY) -m bench.backup
