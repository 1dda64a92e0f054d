# Two commands on a fresh machine: `make demo` (set up, then the whole demo pipeline)
# and `make test` (set up, then the tests). Everything installs into .venv.
#
# Python: the newest of 3.13, 3.12 and 3.11 on the PATH, into .venv. `make test PYTHON=python3.12` uses that one
# instead, in its own folder (.venv-3.12), so several versions live side by side.
SUPPORTED := python3.13 python3.12 python3.11
FOUND := $(foreach p,$(SUPPORTED),$(shell $(p) -c "import venv; print('$(p)')" 2>/dev/null))
ifeq ($(origin PYTHON),undefined)
PYTHON := $(firstword $(FOUND))
VENV ?= .venv
endif
ifeq ($(PYTHON),)
$(error none of $(SUPPORTED) is on the PATH: install one, or say which with PYTHON=/path/to/python3)
endif
PYVER := $(shell $(PYTHON) -c "import sys; print('%d.%d' % sys.version_info[:2])" 2>/dev/null)
ifeq ($(PYVER),)
$(error PYTHON=$(PYTHON) does not run here (try its full path, e.g. PYTHON=/usr/bin/python3.12))
endif
ifeq ($(filter 3.11 3.12 3.13,$(PYVER)),)
$(error PYTHON=$(PYTHON) is Python $(PYVER); chatforge needs 3.11, 3.12 or 3.13)
endif
VENV ?= .venv-$(PYVER)
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CHROMIUM := /usr/bin/chromium

.PHONY: setup demo test test-slow test-avx2 smoke pythons lint bench clean

# A venv of another Python in the same folder is replaced, not patched.
$(STAMP): pyproject.toml
	@$(PY) -c "import sys; sys.exit('%d.%d' % sys.version_info[:2] != '$(PYVER)')" 2>/dev/null \
		|| { rm -rf $(VENV) && $(PYTHON) -m venv $(VENV); }
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

setup: $(STAMP)

# The browser test drives Debian's Chromium through Playwright (Playwright's own browser download needs
# the internet). Installed once, as root, from Debian's packages.
$(CHROMIUM):
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null

demo: $(STAMP)
	@echo "chatforge: Python $(PYVER) in $(VENV)"
	$(VENV)/bin/chatforge demo

test: $(STAMP) $(CHROMIUM)
	@echo "chatforge: Python $(PYVER) in $(VENV)"
	$(VENV)/bin/ruff check src tests bench scripts
	$(PY) -m pytest -q

# A quick check of another Python: the CLI's --help, a tiny pretrain -> SFT -> generate round trip, the
# server answering the OpenAI client (.ci/run runs it on the versions the full suite did not use).
smoke: $(STAMP)
	@echo "chatforge: Python $(PYVER) in $(VENV)"
	$(PY) -m pytest -q -m smoke

# The supported Pythons that run here, newest first (.ci/run smoke-tests all but the first).
pythons:
	@echo $(FOUND)

test-slow: $(STAMP) $(CHROMIUM)
	$(PY) -m pytest -q -m slow

# The default suite as an AVX2-only CPU runs it, on any x86 CPU: PyTorch's own kernels, MKL, oneDNN and
# torch.compile's generated code limited to AVX2, so bf16 reads as unsupported and everything trains in fp32.
test-avx2: $(STAMP) $(CHROMIUM)
	ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 $(PY) -m pytest -q

bench: $(STAMP)
	$(PY) bench/train_throughput.py
	$(PY) bench/decode.py
	$(PY) bench/serve_load.py

clean:
	rm -rf .venv .venv-3.* runs
