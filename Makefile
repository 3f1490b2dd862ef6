# The README's two commands for a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: setup host-deps test-deps run test clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

# QEMU, udev (for virtme-ng's guest console), kmod (depmod) and the kernel build tools
# (ksmbench validate builds kernels in tests), from the
# machine's own Debian sources; installs only what is missing.
host-deps:
	vm/install-host-deps --build

# what `make test` needs beyond that: Debian's chromium, headless, for the
# HTML report's browser test
test-deps:
	vm/install-host-deps --test

run: setup host-deps
	$(BIN)/ksmbench run --kernel host --out results

test: setup host-deps test-deps
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) build *.egg-info
