# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
# Each creates .venv on first use and installs the project into it.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

CHROMIUM ?= /usr/bin/chromium

.PHONY: demo test test-fast lint bench clean

# setup.py + the C source: a changed decoder is rebuilt (pip install -e compiles stream/_fastreq.c)
$(STAMP): pyproject.toml setup.py stream/_fastreq.c
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned exactly: the CPU build; any other spec pulls CUDA packages.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[train,dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/rta demo

# The status page's browser tests drive Debian's chromium through playwright (never a browser
# download). Installed once when missing and we may (root + apt, as on CI); else they skip.
$(CHROMIUM):
	@if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } \
			|| echo "warning: apt-get install chromium failed (browser tests fail under CI=true, else skip)"; \
	else echo "note: $(CHROMIUM) missing and apt-get unavailable (not root?): browser tests will skip"; fi

test: $(STAMP) $(CHROMIUM)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest -q --durations=30

test-fast: $(STAMP)
	$(VENV)/bin/pytest -q -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(VENV)/bin/rta bench inference
	$(VENV)/bin/rta bench controller
	$(VENV)/bin/rta bench worker

clean:
	rm -rf $(VENV) .rta .pytest_cache
