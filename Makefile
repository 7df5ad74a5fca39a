# Entry points of chatmail-relay. `make build` builds everything, `make test` tests everything.
# Tests use Debian's python3 and Debian's Python libraries (the ones the packages depend on).

PYTHON ?= /usr/bin/python3
PYTEST ?= $(PYTHON) -m pytest
# Debian tools must see Debian's python3, not one a version manager put first on PATH.
SYSTEM_PATH = /usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin

# Debian packages needed to build and test on a fresh Debian 12 or 13 machine (gpg-agent:
# Debian 13's gpg only recommends it, and gpg needs it to make the repository's key).
DEPS = python3 python3-aiosmtpd python3-dkim python3-dnspython python3-filelock \
       python3-jinja2 python3-pytest python3-setuptools \
       python3-venv python3-pip python3-build gpg gpg-agent sqop shellcheck fcgiwrap coturn \
       openssl ca-certificates dovecot-core dovecot-dev \
       debhelper dh-python pybuild-plugin-pyproject python3-all help2man lintian \
       build-essential fakeroot dpkg-dev po-debconf \
       postfix postfix-lmdb dovecot-core dovecot-imapd dovecot-lmtpd nginx libnginx-mod-stream \
       opendkim opendkim-tools nsd systemd python3-qrcode zbar-tools debootstrap systemd-container \
       apt-utils pebble lua5.3 lua5.4 lua-socket lua-cjson unbound python3-hypothesis \
       python3-png piuparts

# Debian 13 runs Python 3.13 (no crypt module): the unit tests also run there when a 3.13
# interpreter exists, in a virtualenv cached outside the checkout.
PY313 ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.13*/bin/python3) $(shell command -v python3.13))
VENV313 ?= $(HOME)/.cache/chatmail-relay/py313-$(shell echo $(PY313_LIBS) | md5sum | cut -c1-8)
PY313_LIBS = aiosmtpd dkimpy dnspython pytest jinja2 qrcode pypng hypothesis

.PHONY: all build debs debs-bookworm debs-trixie repo apk build-previous test test-unit test-config test-dovecot24 test-openrc test-piuparts test-py313 test-package test-system deps demo bench clean

all: build

# Services in these packages (coturn, fcgiwrap, later postfix, dovecot, nginx) must not start
# on the build host: a temporary policy-rc.d denies it while they are installed.
deps:
	apt-get update -qq
	@made=; if [ ! -e /usr/sbin/policy-rc.d ]; then \
		printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d && made=1; \
	fi; \
	echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections; \
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(DEPS) >/dev/null; \
	status=$$?; [ -z "$$made" ] || rm -f /usr/sbin/policy-rc.d; exit $$status

# Heavy build products (the throw-away signing keys) live outside the
# checkout, keyed by their inputs.
export CHATMAIL_BUILD_CACHE ?= /var/cache/chatmail-relay-build
# Where admins reach the repository (goes into chatmail-archive-keyring and the published
# .sources file); the default is where the system tests mount dist/repo.
export CHATMAIL_REPO_URL ?= file:///srv/chatmail-relay

# The Debian releases we build for, and the one this machine runs: packages for another
# release are built in a chroot of it (tests/chroot.sh --suite).
SUITES = bookworm trixie
HOST_SUITE := $(shell . /etc/os-release && echo "$$VERSION_CODENAME")
in_suite = $(if $(filter $(1),$(HOST_SUITE)),,tests/chroot.sh --suite $(1))

# Packages are built from a copy of the tree, so the checkout stays clean. The repository's
# public key goes into the copy for chatmail-archive-keyring.
# build_debs DIR VERSION-SUFFIX OUTDIR [WRAPPER] [REF]: WRAPPER runs the build elsewhere
# (tests/chroot.sh: in another Debian release); DIR must then be inside the checkout. REF:
# the tree of that git commit instead of the working tree.
define build_debs
	rm -rf $(1) && mkdir -p $(1)/src $(3)
	$(if $(5),git archive $(5),tar --exclude=./.git --exclude=./build --exclude=./dist \
		--exclude='*/__pycache__' -cf - .) | tar -xf - -C $(1)/src
	repo/build-repo.sh key $(1)/src/apt/chatmail-archive-keyring.pgp
	[ -z "$(2)" ] || sed -i '1s/(\([^)]*\))/(\1$(2))/' $(1)/src/debian/changelog
	$(call dpkg_buildpackage,$(1)/src,$(1)/build.log,$(4))
	rm -f $(3)/*.deb && mv $(1)/*.deb $(3)/
endef

# dpkg_buildpackage SOURCE-DIR LOG [WRAPPER]: binary packages into SOURCE-DIR's parent.
define dpkg_buildpackage
	$(3) sh -c 'cd $(1) && PATH=$(SYSTEM_PATH) dpkg-buildpackage -b -us -uc --no-sign' \
		>$(2) 2>&1 || { tail -40 $(2); exit 1; }
endef

# The instant-IDLE Dovecot plugin's package (dovecot/plugin/debian), built against this
# release's dovecot-dev from the tree build_debs copied into DIR:
# build_plugin_deb DIR OUTDIR [WRAPPER]
define build_plugin_deb
	$(call dpkg_buildpackage,$(1)/src/dovecot/plugin,$(1)/plugin-build.log,$(3))
	mv $(1)/src/dovecot/*.deb $(2)/
endef

# Our packages for both Debian releases (the instant-IDLE plugin among them) and the signed
# repository with all of them (dist/repo, a suite per release); the Alpine packages and
# their repository (dist/alpine).
build: debs repo apk

debs: $(addprefix debs-,$(SUITES))

# Our packages and the instant-IDLE plugin for one Debian release, in dist/SUITE.
$(addprefix debs-,$(SUITES)): debs-%:
	$(call build_debs,build/$*,,dist/$*,$(call in_suite,$*))
	$(call build_plugin_deb,build/$*,dist/$*,$(call in_suite,$*))
	@ls -1 dist/$*/*.deb

repo:
	repo/build-repo.sh repo dist/repo --suite bookworm dist/bookworm/*.deb \
		--suite trixie dist/trixie/*.deb

# Alpine packages and their signed apk repository in dist/alpine/<arch>/, from
# alpine/chatmail-relay/APKBUILD. APK_KEY=<private .rsa key, .rsa.pub next to it>;
# default: a throw-away key in the build cache.
apk:
	$(PYTHON) alpine/mkapk.py --out dist/alpine $(if $(APK_KEY),--key $(APK_KEY))

# The release before this one, for the system tests' upgrade path: the tree of
# PREVIOUS_REF (the last one that shipped our rebuild of Debian's Dovecot instead of the
# plugin, and the numbered shell steps) with a lower version, and Debian's Dovecot
# standing in for that rebuild under its version (tests/system/repos.py), in their own
# repository (dist/repo-previous, dated a day back as if published before dist/repo).
PREVIOUS_REF = 80b93e9
build-previous: build
	@git cat-file -e $(PREVIOUS_REF)^{commit} 2>/dev/null || { echo "build-previous needs \
		the git history up to $(PREVIOUS_REF) (not a shallow clone)" >&2; exit 1; }
	$(call build_debs,build/previous,~previous,dist/previous,$(call in_suite,bookworm),$(PREVIOUS_REF))
	rm -rf dist/previous/dovecot
	$(PYTHON) -m tests.system.repos previous-dovecot dist/previous/dovecot
	REPO_DATE="$$(date -u -R -d '1 day ago')" repo/build-repo.sh repo dist/repo-previous \
		--suite bookworm dist/previous/*.deb dist/previous/dovecot/*.deb

test: test-unit test-config test-dovecot24 test-package test-openrc test-piuparts test-system \
	test-py313

test-unit:
	$(PYTEST) tests/unit

# Every template rendered for a matrix of configurations and checked with the real
# postconf, doveconf, nginx and opendkim.
test-config:
	$(PYTEST) tests/config

# The Dovecot tests of test-config again with Dovecot 2.4 (our 2.4 configuration, auth.lua
# asking doveauth), in a Debian 13 chroot cached outside the checkout (tests/chroot.sh):
# with Debian 13's 2.4.1, then with Debian testing's newer 2.4 (2.4.5 today, as in
# Alpine 3.23 and our Alpine Dovecot package).
DOVECOT24_TESTS = sh -c 'dovecot --version && exec python3 -m pytest -p no:cacheprovider \
	tests/config/test_dovecot.py'
test-dovecot24:
	tests/chroot.sh $(DOVECOT24_TESTS)
	tests/chroot.sh --dovecot-from forky $(DOVECOT24_TESTS)

test-package: build
	$(PYTEST) tests/package

# The Alpine init scripts and daily jobs run by the real OpenRC (openrc-run,
# supervise-daemon) in the Debian 13 chroot, with python3-chatmaild from dist/trixie, in a
# network namespace of their own (the services listen on their usual ports).
test-openrc: debs-trixie
	tests/chroot.sh unshare --net sh -c 'ip link set lo up && \
		exec python3 -m pytest -p no:cacheprovider tests/openrc'

# piuparts, Debian's own installation checker: each of our packages from dist/repo
# installed into a minimal Debian 12 and 13 and purged, leaving nothing behind.
test-piuparts: build
	$(foreach suite,$(SUITES),tests/piuparts/run.sh $(suite) &&) true

# Installs dist/ in a fresh Debian 12 and a fresh Debian 13 booted with systemd-nspawn
# (root file systems cached outside the checkout by tests/system/rootfs.sh) and uses the
# relays like their users; federation runs between a Debian 12 and a Debian 13 relay.
# The test network's names and addresses are fixed (tests/system/internet.py): one run
# on a machine at a time (run benchmarks that boot relays under the same lock).
SYSTEM_TESTS_LOCK = /tmp/chatmail-system-tests.lock
test-system: build build-previous
	flock $(SYSTEM_TESTS_LOCK) $(PYTEST) tests/system

test-py313:
	@if [ -z "$(PY313)" ]; then echo "test-py313: no Python 3.13 interpreter, skipped"; exit 0; fi; \
	if [ ! -x $(VENV313)/bin/python ]; then \
		$(PY313) -m venv $(VENV313) && $(VENV313)/bin/pip install -q $(PY313_LIBS); \
	fi; \
	$(VENV313)/bin/python -m pytest tests/unit

# A relay in a throw-away container on this machine's network, with an invite link and QR
# code for Delta Chat. Ctrl-C stops it.
demo: build
	$(PYTHON) tests/system/demo.py $(DEMO_ADDRESS)

bench:
	$(PYTHON) bench/run.py

clean:
	rm -rf build dist *.egg-info .pytest_cache
