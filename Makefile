# The README's two commands: `make demo` and `make test`. Both create .venv when it is missing.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
# Idle OpenMP threads sleep instead of spinning: with 2 cores and 2 pytest workers, spin-waiting made
# torch steps up to 15x slower (measured while pretraining the shapes model under load).
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: install sysdeps test test-fast demo bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed sysdeps

# Debian engines used by real (not mocked) rewards and browser tests: tesseract (OCR), chromium (galleries).
sysdeps:
	@command -v tesseract >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq tesseract-ocr >/dev/null; \
	  else echo "tesseract-ocr is missing: sudo apt-get install tesseract-ocr"; fi; }
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "chromium is missing: sudo apt-get install chromium"; fi; }

# --maxschedchunk 1: xdist hands out tests one at a time, so the longest-first order of tests/conftest.py holds and
# the two workers finish together
test: install
	$(PY) -m pytest -n 2 --maxschedchunk 1 --durations=15 $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest -n 2 -m "not slow" $(PYTEST_ARGS)

demo: $(VENV)/.installed
	$(PY) -m flowalign.cli demo

clean:
	rm -rf $(VENV) build *.egg-info outputs
