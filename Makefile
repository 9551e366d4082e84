# dsv3ray — the README's two commands are `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo demo-distill test lint format gpu-check clean

install: $(STAMP)

# torch is pinned in the install step itself: a looser spec pulls a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: install
	$(BIN)/dsv3ray demo $(if $(DEMO_CONFIG),--config $(DEMO_CONFIG))

# two-stage distillation: a dense teacher, then the MoE student labelled by teacher actors
demo-distill: install
	$(BIN)/dsv3ray demo --config configs/distill_demo.toml

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

gpu-check: install
	bash benchmarks/gpu_check.sh

clean:
	rm -rf $(VENV) runs
