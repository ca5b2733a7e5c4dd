# One command each on a fresh machine: `make demo`, `make test` (`make ab`, `make ab-long`: the CPU A/Bs).
# Each creates the virtual environment (Python 3.12, pinned deps) when it is missing.

VENV ?= .venv
PYTHON ?= $(shell scripts/find_python.sh)
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat requirements-ci.txt setup.py | cksum | cut -d' ' -f1)

.PHONY: demo test test-fast ab ab-long ab-kv-budget ab-mla-long ab-mla-kv-budget plan bench-attention bench-collectives gpu-check venv clean

venv: $(STAMP)

$(STAMP): requirements-ci.txt setup.py
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements-ci.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	@rm -f $(VENV)/.installed-*
	@touch $@

demo: $(STAMP)
	$(PY) -m megatron_mxn.demo

ab: $(STAMP)
	$(PY) scripts/ab_compare.py --config configs/cpu_dense.yaml --config configs/cpu_moe.yaml \
		--layouts baseline,grid,tp,tp_fused --run ab-cpu

ab-long: $(STAMP)  # the context sweep: ~11 min on 2 CPU cores (README)
	$(PY) scripts/ab_compare.py --config configs/cpu_long.yaml \
		--layouts baseline,tp,tp_fused,grid,grid_dims --prompt-lengths 512,2048,4096,8192 --run ab-long
	$(MAKE) ab-mla-long

ab-kv-budget: $(STAMP)  # every layout at the same KV-cache budget per rank, its largest batch
	$(PY) scripts/ab_compare.py --config configs/cpu_long.yaml \
		--layouts tp,tp_fused,baseline,grid,grid_1x4 --prompt-lengths 2048,4096,8192 \
		--kv-budget-mib 8 --run ab-kv-budget
	$(MAKE) ab-mla-kv-budget

# MLA + MoE (configs/cpu_mla.yaml, DeepSeek-V3-shaped): the same two A/Bs (make ab-long and make
# ab-kv-budget run them after cpu_long's); the grid keeps MLA's latent cache by position.
ab-mla-long: $(STAMP)
	$(PY) scripts/ab_compare.py --config configs/cpu_mla.yaml \
		--layouts baseline,tp,tp_fused,grid,grid_1x4 --prompt-lengths 512,2048,4096,8192 --run ab-mla-long

ab-mla-kv-budget: $(STAMP)  # MLA at an equal KV-cache budget: the latent cache vs TP's K/V
	$(PY) scripts/ab_compare.py --config configs/cpu_mla.yaml \
		--layouts tp,tp_fused,baseline,grid,grid_1x4 --prompt-lengths 2048,4096,8192 \
		--kv-budget-mib 16 --run ab-mla-kv-budget

plan: $(STAMP)
	$(PY) -m megatron_mxn.tools.plan --config configs/paper_dense.yaml

bench-attention: $(STAMP)
	$(PY) scripts/bench_attention.py

bench-collectives: $(STAMP)  # what one collective costs on 4 ranks here (the A/Bs measure it too)
	OMP_NUM_THREADS=1 $(PY) -m torch.distributed.run --nproc-per-node 4 \
		-m megatron_mxn.tools.collective_latency --output-md results/bench_collectives.md

gpu-check: $(STAMP)
	PYTHON=$(PY) bash scripts/gpu_check.sh

test: $(STAMP)
	$(PY) -m pytest -q tests

test-fast: $(STAMP)  # the in-process tier (no worker pools, no launched jobs): ~1 min
	$(PY) -m pytest -q -m fast tests

clean:
	rm -rf $(VENV) .pytest_cache
