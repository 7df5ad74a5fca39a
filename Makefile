# Entry points of chatmail-relay. `make build` builds everything, `make test` tests everything.
# Tests use Debian's python3 and Debian's Python libraries (the ones the packages depend on).

PYTHON ?= /usr/bin/python3
PYTEST ?= $(PYTHON) -m pytest

# Debian packages needed to build and test on a fresh Debian 12 machine.
DEPS = python3 python3-aiosmtpd python3-dkim python3-dnspython python3-filelock \
       python3-jinja2 python3-psutil python3-requests python3-pytest python3-setuptools \
       python3-venv python3-pip python3-build gpg sqop shellcheck

.PHONY: all build test test-unit deps bench clean

all: build

deps:
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(DEPS) >/dev/null

build:
	$(PYTHON) -m build --no-isolation --outdir dist .

test: test-unit

test-unit:
	$(PYTEST) tests/unit

bench:
	$(PYTHON) bench/run.py

clean:
	rm -rf build dist *.egg-info .pytest_cache
