# Two commands on a fresh machine: `make demo` (set up, then the whole demo pipeline)
# and `make test` (set up, then the tests). Everything installs into .venv.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CHROMIUM := /usr/bin/chromium

.PHONY: setup demo test test-slow test-avx2 lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
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
	$(VENV)/bin/chatforge demo

test: $(STAMP) $(CHROMIUM)
	$(VENV)/bin/ruff check src tests bench scripts
	$(PY) -m pytest -q

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
	rm -rf $(VENV) runs
