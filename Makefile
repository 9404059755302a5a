# tritonmoe: `make test` and `make reproduce` bootstrap their own virtual environment.
# Without an NVIDIA GPU the venv gets torch's CPU build (never the multi-GB CUDA build)
# and the kernels run through Triton's CPU interpreter.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
# torch's CPU build (its wheel is cached on the project's machines); triton 3.6 as on the lent GPUs
CPU_TORCH := torch==2.13.0 triton==3.6.0
PYTEST_WORKERS ?= auto

.DEFAULT_GOAL := help
.PHONY: help venv test experiments reproduce paper gpu-carry clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@if [ -n "$(HAS_GPU)" ]; then \
	  echo "GPU found: installing torch with CUDA"; $(PY) -m pip install -q torch; \
	else \
	  echo "no GPU: installing torch's CPU build ($(CPU_TORCH))"; $(PY) -m pip install -q $(CPU_TORCH); \
	fi
	$(PY) -m pip install -q -e '.[dev]'
	@touch $@

venv: $(VENV)/.installed  ## create the virtual environment

test: $(VENV)/.installed  ## run the test suite (GPU if visible, else the CPU interpreter)
	$(PY) -m pytest -n $(PYTEST_WORKERS) -q tests

# With a GPU: the measurements behind the tables (Megablocks must be installed for its rows:
# experiments/README.md). Without one: every experiment at tiny shapes through the interpreter,
# into results/smoke/ (git-ignored), which proves the pipeline and leaves results/<GPU>/ alone.
experiments: $(VENV)/.installed  ## run the experiments: the full grid on a GPU, the smoke profile without one
ifeq ($(HAS_GPU),1)
	$(PY) -m experiments -m experiment=latency profile=gpu model=mixtral_8x7b,qwen2_57b_a14b,deepseek_v3
	$(PY) -m experiments -m experiment=stages profile=gpu model=mixtral_8x7b,deepseek_v3
	$(PY) -m experiments experiment=skew profile=gpu model=mixtral_8x7b
	$(PY) -m experiments experiment=traffic profile=gpu model=mixtral_8x7b  # Nsight Compute (ncu) on PATH
	$(PY) -m experiments experiment=hf_model profile=gpu model=mixtral_8x7b
else
	@echo "no GPU: the smoke profile (tiny shapes, CPU interpreter) -> results/smoke/; the committed GPU results stay"
	$(PY) -m experiments -m experiment=latency,stages,skew,traffic,hf_model profile=smoke model=mixtral_8x7b
endif

reproduce: test experiments figures paper  ## tests, experiments, then tables, figures and the paper
	@echo
	@echo "make reproduce ran the test suite and the experiments ($(if $(HAS_GPU),on the GPU: results/<GPU>/,without a GPU: the smoke profile only, results/smoke/)),"
	@echo "rebuilt the tables (paper/tables/), figures (figures/) and quoted numbers"
	@echo "(paper/generated/numbers.tex) from the committed results in results/, and built paper/main.pdf."
	@echo "$(if $(HAS_GPU),The tables use what results/ holds now: commit new measurements to keep them.,The tables and the paper use the committed H100 measurements; nothing was measured on this machine.)"

# The notebooks' dependencies (pyproject's `experiments` extra), on top of the test environment.
$(VENV)/.experiments: $(VENV)/.installed pyproject.toml
	$(PY) -m pip install -q -e '.[experiments]'
	@touch $@

.PHONY: figures  # phony: a figures/ folder exists
figures: $(VENV)/.experiments  ## run notebooks/[0-9]*.ipynb: results/ -> paper/tables/, figures/
	$(PY) notebooks/run_all.py

# The paper: LaTeX only (latexmk, pdflatex, bibtex; Debian: latexmk texlive-latex-base
# texlive-latex-recommended). Builds from what is committed; `make figures` regenerates its inputs.
paper:  ## build paper/main.pdf from paper/main.tex, the tables, figures and generated numbers
	cd paper && latexmk -pdf -interaction=nonstopmode -halt-on-error main.tex

gpu-carry:  ## stage what a lent GPU machine (no internet) needs: pytest wheels, Megablocks sdists
	mkdir -p .carry && rm -rf .carry/baselines && cp -r ../shared/baselines .carry/baselines  # the sdists
	rm -rf .whl && $(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
	  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
	  pytest pluggy iniconfig pygments packaging pytest-xdist execnet hydra-core==1.3.8 omegaconf==2.3.1 PyYAML \
	  'numpy<2.4'  # the interpreter-run tests (gloo ranks, smoke) need numpy < 2.4 there too
	$(PYTHON) -m pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3  # hydra's pin ships no wheel

clean:  ## remove the virtual environment, caches and LaTeX byproducts (never results/ or tables)
	rm -rf $(VENV) .pytest_cache
	cd paper && rm -f main.aux main.log main.bbl main.blg main.out main.toc main.fls main.fdb_latexmk main.synctex.gz main.pdf
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
