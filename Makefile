# One-command set-up: every target creates or refreshes .venv whenever requirements.txt or pyproject.toml
# changes (sha256 stamp): the pinned lock first, then this project in editable mode without dependencies.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.requirements.sha256
# torch's default OpenMP threads spin while waiting: on a shared 2-core machine that made one clip ~20x slower.
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: venv demo test test-fast lint bench gpu-check train sao-check chromium clean

venv:
	@if [ ! -x $(PY) ]; then $(PYTHON) -m venv $(VENV); fi
	@want=$$(cat requirements.txt pyproject.toml | sha256sum); \
	if [ "$$(cat $(STAMP) 2>/dev/null)" != "$$want" ]; then \
		echo "Installing requirements.txt into $(VENV) (first time: ~6 GB, a few minutes)"; \
		$(PY) -m pip install -q --upgrade pip && \
		$(PY) -m pip install -q -r requirements.txt && \
		$(PY) -m pip install -q --no-deps -e . && \
		echo "$$want" > $(STAMP); \
	fi

chromium:
	@command -v chromium >/dev/null 2>&1 || { \
		if [ "$$(id -u)" = 0 ]; then \
			echo "Installing Debian chromium for the browser test"; \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
		else echo "chromium missing and not root: the browser test will be skipped"; fi; }

demo: venv
	$(VENV)/bin/ptq-lab $(ARGS)

lint: venv
	$(VENV)/bin/ruff check .

test: lint chromium
	$(PY) -m pytest -q tests $(ARGS)

test-fast: venv
	$(PY) -m pytest -q -m "not slow and not browser" tests $(ARGS)

bench: venv
	$(VENV)/bin/ptq-bench $(ARGS)

# On a CUDA machine: every preset at SAO's shape (integer vs simulated, speed vs bf16/fp16, memory) + one app comparison
gpu-check: venv
	$(PY) -m bench.gpu_check --out results/gpu_check.json $(ARGS)

train: venv
	$(VENV)/bin/ptq-train $(ARGS)

# Stable Audio Open at real scale on a random-weight model of its architecture (~20 min on a quiet machine, 10 GiB): docs/sao.md
sao-check: venv
	$(PY) scripts/sao_check.py $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache *.egg-info
