# Set-up on a fresh machine: `make test` or `make quick` (both create .venv/ through `make venv`).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# The CPU build of torch is pinned here (a local wheel on our machines); pyproject states a range.
TORCH_PIN ?= torch==2.13.0
QUICK_DATA ?= data/metaworld_quick
QUICK_TASKS ?= reach-v3,push-v3,pick-place-v3,door-open-v3,drawer-open-v3
export MUJOCO_GL ?= egl

.PHONY: venv lint test test-all quick clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_PIN)"
	$(BIN)/python -m pip install -q -e ".[metaworld,zarr,dev]"
	touch $(STAMP)

lint: venv
	$(BIN)/ruff check .

test: venv
	$(BIN)/python -m pytest -q

test-all: venv
	$(BIN)/python -m pytest -q -m "slow or not slow"

QUICK_STEPS ?= 400

# The quick sweep (sweeps/quick.yaml: Mini-Diffuser small at M = 1 and 64) on the embedded suite; re-running
# it skips finished runs and resumes interrupted ones.
quick: venv
	$(BIN)/mdh data metaworld --tasks $(QUICK_TASKS) --episodes 10 --out $(QUICK_DATA)
	$(BIN)/mdh data inspect $(QUICK_DATA)
	$(BIN)/mdh sweep quick data.path=$(QUICK_DATA) train.steps=$(QUICK_STEPS)
	$(BIN)/mdh sweep status results/quick
	$(BIN)/mdh report results/quick
	@echo "report: results/quick/report.md"

clean:
	rm -rf $(VENV) build *.egg-info

# Local single-node SLURM cluster for tests/slurm (README "Local SLURM cluster"); needs root and apt.
# Clients then need: eval "$$(scripts/slurm-local.sh env)"   (the tests set it themselves)
.PHONY: slurm-up slurm-down

slurm-up:
	bash scripts/slurm-local.sh install
	bash scripts/slurm-local.sh up
	@bash scripts/slurm-local.sh env

slurm-down:
	bash scripts/slurm-local.sh down
