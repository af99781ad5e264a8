# `make demo` and `make test` bootstrap a virtual environment with the CPU build of torch.
# GPU users: `make TORCH=torch` (or install your CUDA torch into .venv first).
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
BIN    := $(VENV)/bin
RUN    ?= runs/demo
RING   ?= runs/ring
# pytest-xdist workers for `make test`: one per core of a CI runner (each uses one thread)
WORKERS ?= 2

.PHONY: venv demo demo-ring test lint format bench mutation clean

# clean-fid comes last and without its declared dependencies: its torchvision pin would replace
# torch, and disback imports only its torchvision-free modules. Installed before another package,
# it would make pip print a dependency-conflict ERROR that is no failure.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[dev,plot,tensorboard,wandb,diffusers,onnx]"
	$(BIN)/pip install --quiet --no-deps "clean-fid==0.1.35"
	touch $@

venv: $(VENV)/.installed

demo: $(VENV)/.installed
	rm -rf $(RUN)
	$(BIN)/disback demo --out $(RUN)

demo-ring: $(VENV)/.installed
	rm -rf $(RING)
	$(BIN)/disback record --config recipes/ring2d.toml --out $(RING)
	$(BIN)/disback backtrack --config recipes/ring2d.toml --trajectory $(RING) --eval-every 100
	$(BIN)/disback backtrack --config recipes/ring2d.toml --trajectory $(RING) --eval-every 100 --no-trajectory --name baseline
	$(BIN)/disback sample --trajectory $(RING) -n 2000 --out $(RING)/disback.npz
	$(BIN)/disback sample --trajectory $(RING) --name baseline -n 2000 --out $(RING)/baseline.npz
	$(BIN)/disback evaluate $(RING)/disback.npz
	$(BIN)/disback evaluate $(RING)/baseline.npz
	$(BIN)/disback plot $(RING)/backtrack/default $(RING)/backtrack/baseline --out $(RING)/curves.png
	$(BIN)/disback runs $(RING)

test: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/pytest -q -n $(WORKERS)

# Does the suite catch the bugs nobody listed? mutmut over the modules whose source changed since
# their last result (MUTATION_ALL=1: every module, about an hour), then the hand-written list
# (~30 min). docs/testing.md has the kill rates and the survivors.
mutation: $(VENV)/.installed
	$(BIN)/pip install --quiet "mutmut==3.8.1"
	$(BIN)/python benchmarks/mutation_tool.py $(if $(MUTATION_ALL),--all,)
	$(BIN)/python benchmarks/mutation.py

format: $(VENV)/.installed
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: $(VENV)/.installed
	$(BIN)/python benchmarks/ring2d_curves.py --seeds 0 1 2

clean:
	rm -rf $(VENV) runs
