# The README's two commands: `make pretrain` and `make test`. Both create the environment first.
# `make finetune` is a third, run after `make pretrain` (it starts from its checkpoint).
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export DS_ACCELERATOR ?= cpu
export OMP_NUM_THREADS ?= 1
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: venv test test-cluster lint pytest pretrain finetune clean

venv: $(STAMP)

# One install step for everything: torch is pinned in requirements.txt to the CPU build on local
# disk, and the project is installed with --no-deps so nothing it declares can upgrade torch.
$(STAMP): requirements.txt setup.py megatron_glm/data/_native.c
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy megatron_glm tools

pytest: $(STAMP)
	$(BIN)/python -m pytest -n 2 --dist loadgroup -q -m "not cluster" tests

# Launch paths against real services (SLURM, Open MPI, pdsh over ssh): .ci/setup_services.sh
# installs and starts them from Debian packages (root); MEGATRON_GLM_REQUIRE_CLUSTER=1 turns a
# missing service into a failure instead of a skip. One test at a time: they share one scheduler.
test-cluster: $(STAMP)
	.ci/setup_services.sh
	MEGATRON_GLM_REQUIRE_CLUSTER=1 $(BIN)/python -m pytest -q -s -m cluster --durations=0 tests

# ruff (lint + format) and mypy are blocking, like the tests.
test: lint pytest

# The demo pipeline: each step is a file target, so re-running reuses what exists and the
# training run itself auto-resumes from the last checkpoint in checkpoints/demo.
DEMO := data/demo
DEMO_PORT ?= 29517
# The closing fill: held-out sentences and blank accuracy (tools/fill_blank.py), then a text with
# two blanks through tools/generate.py (the same decoder and strategy; try --interactive yourself).
DEMO_TEXT ?= Return the [MASK] of the list, or raise [MASK] if the list is empty.
DEMO_STRATEGY := --max-new-tokens 8 --no-repeat-ngram-size 2 --repetition-penalty 1.3

$(DEMO)/corpus.jsonl: | $(STAMP)
	mkdir -p $(DEMO)
	$(BIN)/python tools/make_demo_corpus.py --output $@

$(DEMO)/tok.model: $(DEMO)/corpus.jsonl
	$(BIN)/python tools/train_tokenizer.py --input $< --model-prefix $(DEMO)/tok --vocab-size 8000

$(DEMO)/demo_text_sentence.idx: $(DEMO)/tok.model
	$(BIN)/python tools/preprocess_data.py --input $(DEMO)/corpus.jsonl --json-keys text \
		--output-prefix $(DEMO)/demo --tokenizer-model $(DEMO)/tok.model \
		--workers 2 --append-eod --split-sentences

pretrain: $(STAMP) $(DEMO)/demo_text_sentence.idx
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/deepspeed --num_gpus 2 --master_port $(DEMO_PORT) \
		--module megatron_glm.pretrain --config configs/demo.yaml
	$(BIN)/python tools/fill_blank.py --config configs/demo.yaml
	echo '$(DEMO_TEXT)' | $(BIN)/python tools/generate.py --load checkpoints/demo --interactive \
		$(DEMO_STRATEGY)

# The finetuning demo: the two tasks made from the corpus (tools/make_demo_tasks.py prints their
# sizes and baselines once, and keeps the baselines in baselines.json), a finetuning run of each
# from the pretraining checkpoint (configs/finetune/*.yaml, 2 ranks as in pretraining; a re-run
# resumes, and exits at once when complete), then the test figures of each run's best checkpoint
# (by validation accuracy or loss) against the baselines.
# It does not start `make pretrain` itself: that is a training run of its own with its own closing
# demo, not something to start as a side effect; without its checkpoint this stops with exit 2.
TASKS := $(DEMO)/tasks
FINETUNE_PORT ?= 29518
FINETUNE_TASKS := pkgcls summ
FINETUNE_ARGS ?=  # overrides for both runs, e.g. train.train_iters=20 (a quick check)

$(TASKS)/baselines.json: $(DEMO)/corpus.jsonl tools/make_demo_tasks.py megatron_glm/data/demo_tasks.py
	$(BIN)/python tools/make_demo_tasks.py --corpus $< --output $(TASKS)

# A rule only for when the file is missing: make pretrain writes it.
checkpoints/demo/latest:
	@echo "make finetune: checkpoints/demo has no 'latest': run make pretrain first" >&2; exit 2

finetune: $(STAMP) checkpoints/demo/latest $(TASKS)/baselines.json
	for task in $(FINETUNE_TASKS); do \
		PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/deepspeed --num_gpus 2 --master_port $(FINETUNE_PORT) \
			--module megatron_glm.finetune --config configs/finetune/$$task.yaml $(FINETUNE_ARGS) \
			|| exit $$?; \
	done
	$(BIN)/python tools/demo_finetune_report.py --best --baselines $(TASKS)/baselines.json

clean:
	rm -rf $(VENV) build *.egg-info
