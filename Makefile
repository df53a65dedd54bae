# One-command set-up: `make demo` and `make test` create or refresh .venv whenever requirements.txt
# changes (sha256 stamp), install Debian's chromium for the browser test, then run.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.requirements.sha256
# torch's default OpenMP threads spin while waiting: on a shared 2-core machine that made one clip ~20x slower.
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: venv demo test bench train chromium clean

venv:
	@if [ ! -x $(PY) ]; then $(PYTHON) -m venv $(VENV); fi
	@if ! sha256sum --status -c $(STAMP) 2>/dev/null; then \
		echo "Installing requirements.txt into $(VENV) (first time: ~6 GB, a few minutes)"; \
		$(PY) -m pip install -q --upgrade pip && \
		$(PY) -m pip install -q -r requirements.txt && \
		sha256sum requirements.txt > $(STAMP); \
	fi

chromium:
	@command -v chromium >/dev/null 2>&1 || { \
		if [ "$$(id -u)" = 0 ]; then \
			echo "Installing Debian chromium for the browser test"; \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
		else echo "chromium missing and not root: the browser test will be skipped"; fi; }

demo: venv
	$(PY) app.py $(ARGS)

test: venv chromium
	$(PY) -m pytest -q tests $(ARGS)

bench: venv
	$(PY) -m lab.bench $(ARGS)

train: venv
	$(PY) scripts/train_demo_model.py $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
