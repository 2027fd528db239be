# Thin wrappers: every target calls one `tinystories-lab` verb (`make help` lists them; the verbs'
# own --help explains every option). Make variables map onto CLI flags: MODEL=, ARGS=, LOGGER=,
# QUEUE=, TEXT=, STEPS=, REPO=, DEVICE=, ... DATA_DIR= is where data, data-sample and the benchmarks
# read and write; the configs themselves read data/ (override with ARGS="--data.init_args.data_dir=...").

PYTHON ?= python3
VENV ?= .venv
# The torch requirement `make install` uses (CI pins TORCH=torch==2.13.0), and the wheel index it comes
# from. PyPI's Linux wheels are CUDA builds (they run on a CPU too); PyTorch's CPU-only build comes
# from TORCH_INDEX=https://download.pytorch.org/whl/cpu.
TORCH ?= torch>=2.7
TORCH_INDEX ?=
BIN := $(VENV)/bin
LAB := $(BIN)/tinystories-lab

MODEL ?=
DATA_DIR ?= data
VOCAB ?= 32000
SAMPLE_VOCAB ?= 8192
QUEUE ?=
ARGS ?=
LOGGER ?=
OPTIONAL ?=
DELETE ?=
RESTART ?=
RESIZE ?=
WAIT ?=
MICRO ?=
SEEDS ?=
TEXT ?=
GPT ?=
LLAMA ?=
DEVICE ?=
DEVICES ?=
STRATEGY ?=
REPO ?=
STEPS ?=
PRECISION ?=
HF ?=
REVISION ?=
CONTEXT ?=
SOURCE ?=
DRAFT ?=
TARGET ?=
K ?=
DATA ?= sample
METHOD ?= lora
LR ?=
BENCH_OUT ?= benchmarks/results
NODES ?= 1
QUANT ?= f32
# pytest-xdist workers for `make test`, each given its share of the cores (tests/conftest.py).
TEST_WORKERS ?= 2
PORT ?= 8000
JUDGE_URL ?=
JUDGE_MODEL ?=
JUDGE_TIMEOUT ?=

# QUEUE=file limits every target that takes experiments to that queue file; without it the run targets
# use experiments.yaml and the others experiments.yaml and experiments.demo.yaml.
QUEUES_FLAG = $(if $(QUEUE),--queues '[$(QUEUE)]')
# PRECISION= joins the run's arguments, so it is recorded with them and kept when the run resumes.
RUN_FLAGS = $(QUEUES_FLAG) --args='$(if $(PRECISION),--precision=$(PRECISION) )$(ARGS)' \
	$(if $(LOGGER),--logger $(LOGGER)) $(if $(WAIT),--wait true) $(if $(MICRO),--micro_batch_size $(MICRO)) \
	$(if $(RESIZE),--resize true)
DEMO_QUEUE = --queues '[experiments.demo.yaml]'
DEVICE_FLAG = $(if $(DEVICE),--device $(DEVICE))
EVAL_TEXT_FLAGS = $(if $(TEXT),--text '$(TEXT)') $(if $(SOURCE),--source '$(SOURCE)') --data_dir $(DATA_DIR)
BENCH_FLAGS = $(if $(MODEL),--model '$(MODEL)') $(if $(STEPS),--steps $(STEPS)) --data_dir $(DATA_DIR) \
	--out_dir $(BENCH_OUT) $(DEVICE_FLAG) $(QUEUES_FLAG)

.DEFAULT_GOAL := help
.PHONY: help install test lint configs data data-sample list run-next run-specific run-all reset cancel slurm-local slurm-local-stop demo demo-seeds \
	eval eval-hf eval-reference sample quality report interpret interpret-compare interpret-timeline export gguf serve install-gguf publish bench bench-sweep bench-generate bench-data \
	step-memory gpu-check speculative data-instruct data-instruct-sample finetune

help: ## List every target with one line each
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-20s %s\n", $$1, $$2}'

install: ## Create .venv and install the project (TORCH=torch==2.13.0 pins torch; TORCH_INDEX= its wheel index)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet '$(TORCH)' $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/pip install --quiet -e '.[dev]'

# llama-cpp-python builds llama.cpp from source: without the multimodal mtmd library (the package loads it
# only for image chat), on every core. Measured in docs/export.md. llama.cpp's AMX kernels (Intel Xeon since
# Sapphire Rapids) crashed on the demo models' q8_0 matrices here (segfault in ggml_backend_amx_mul_mat,
# llama-cpp-python 0.3.36), and models this small gain nothing from them: off on x86-64.
AMX_OFF = -mno-amx-tile -mno-amx-int8 -mno-amx-bf16
NO_AMX = $(if $(filter x86_64,$(shell uname -m)),-DCMAKE_C_FLAGS='$(AMX_OFF)' -DCMAKE_CXX_FLAGS='$(AMX_OFF)')
GGUF_BUILD_ENV = CMAKE_ARGS="-DLLAVA_BUILD=OFF $(NO_AMX) $(CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc)

install-gguf: ## Add the GGUF extra to .venv: llama-cpp-python (built from source, minutes), gguf, its server
	$(GGUF_BUILD_ENV) $(BIN)/pip install --quiet --no-cache-dir -e '.[dev,gguf]'  # not a wheel built with other flags

test: ## Run the test suite in TEST_WORKERS=2 processes (real `litgpt pretrain` runs on the sample; minutes)
	$(BIN)/pytest -n $(TEST_WORKERS) --dist loadgroup

lint: ## Check style with ruff
	$(BIN)/ruff check src tests scripts
	$(BIN)/ruff format --check src tests scripts

# Data and configs

data: ## Download TinyStories, train the 32k tokenizer, write token files (VOCAB=32000)
	$(LAB) data --source tinystories --vocab_size $(VOCAB) --data_dir $(DATA_DIR)

data-sample: ## Same for the bundled sample, offline (SAMPLE_VOCAB=8192)
	$(LAB) data --source sample --vocab_size $(SAMPLE_VOCAB) --data_dir $(DATA_DIR)

configs: ## Print every config's shape and true parameter count
	$(LAB) configs

# Training: the experiment queue

list: ## Show every experiment: architecture, parameters, status, progress, last val loss (QUEUE=)
	$(LAB) list $(QUEUES_FLAG)

run-next: ## Train the next todo experiment, resuming it if interrupted (ARGS= LOGGER= MICRO= PRECISION= OPTIONAL=1 RESTART=1 RESIZE=1 WAIT=1)
	$(LAB) run-next $(RUN_FLAGS) $(if $(OPTIONAL),--include_optional true) $(if $(RESTART),--restart true)

run-specific: ## Train one experiment by name: MODEL=gpt_6L_6H_288D (SEEDS=3: each of 3 seeds; ARGS= LOGGER= MICRO= PRECISION= RESTART=1 RESIZE=1 WAIT=1)
	$(LAB) run-specific '$(MODEL)' $(RUN_FLAGS) $(if $(RESTART),--restart true) $(if $(SEEDS),--seeds $(SEEDS))

run-all: ## Train every todo experiment in order, past failures (ARGS= LOGGER= MICRO= PRECISION= OPTIONAL=1 RESIZE=1 WAIT=1)
	$(LAB) run-all $(RUN_FLAGS) $(if $(OPTIONAL),--include_optional true)

reset: ## Put MODEL back to todo; checkpoints and arguments kept unless DELETE=1
	$(LAB) reset '$(MODEL)' $(QUEUES_FLAG) $(if $(DELETE),--delete_run_folder true)

cancel: ## Stop MODEL (cancel its SLURM job, or stop its local runner) and put it back to todo
	$(LAB) cancel '$(MODEL)' $(QUEUES_FLAG)

slurm-local: ## Start a SLURM cluster on this machine, NODES=1 (or 2: two slurmd; installs slurm-wlm and munge with apt, as root)
	NODES=$(NODES) bash scripts/slurm_local.sh start

slurm-local-stop: ## Stop the daemons `make slurm-local` started (by their PIDs in .slurm/)
	bash scripts/slurm_local.sh stop

demo: data-sample ## Offline demo: sample data, train both demo models (PRECISION=), eval, samples, interpret, timelines, report
	precision=$(or $(PRECISION),$$($(LAB) precision)) && \
		$(LAB) run-all $(DEMO_QUEUE) --args="--precision=$$precision "'$(ARGS)'
	$(LAB) eval $(DEMO_QUEUE)
	$(LAB) sample $(DEMO_QUEUE)
	$(LAB) interpret-compare gpt_demo llama_demo $(DEMO_QUEUE)
	$(LAB) interpret-timeline $(DEMO_QUEUE)
	$(LAB) report $(DEMO_QUEUE)

demo-seeds: data-sample ## The demo with 3 seeds of each model (SEEDS=): the report gives intervals and Welch's t-test
	precision=$(or $(PRECISION),$$($(LAB) precision)) && for model in gpt_demo llama_demo; do \
		$(LAB) run-specific $$model $(DEMO_QUEUE) --seeds $(or $(SEEDS),3) --args="--precision=$$precision "'$(ARGS)' \
		|| exit 1; done
	$(LAB) eval $(DEMO_QUEUE)
	$(LAB) sample $(DEMO_QUEUE)
	$(LAB) report $(DEMO_QUEUE)

# Evaluation and interpretability

eval: ## Loss, perplexity, bits/byte of finished runs on the whole validation split (MODEL=, TEXT=, DEVICE=)
	$(LAB) eval $(if $(MODEL),--model '$(MODEL)') $(if $(TEXT),--text '$(TEXT)') $(QUEUES_FLAG) $(DEVICE_FLAG)

eval-hf: ## Bits/byte of any transformers model on the same stories: HF=hub-id-or-folder (TEXT= REVISION= CONTEXT= SOURCE= DEVICE=)
	$(LAB) eval-hf '$(HF)' $(EVAL_TEXT_FLAGS) $(if $(REVISION),--revision '$(REVISION)') \
		$(if $(CONTEXT),--context $(CONTEXT)) $(DEVICE_FLAG)

eval-reference: ## The published TinyStories models, pinned, scored as eval-hf does (needs a network once; MODEL= TEXT= SOURCE=)
	$(LAB) eval-reference $(if $(MODEL),--model '$(MODEL)') $(EVAL_TEXT_FLAGS) $(DEVICE_FLAG)

sample: ## Stories from finished runs for fixed prompts and seeds (MODEL=, DEVICE=)
	$(LAB) sample $(if $(MODEL),--model '$(MODEL)') $(QUEUES_FLAG) $(DEVICE_FLAG)

quality: ## Story quality of finished runs -> quality.json: judge-free measures; the paper's grades with JUDGE_URL= JUDGE_MODEL= (MODEL=, DEVICE=)
	$(LAB) quality $(if $(MODEL),--model '$(MODEL)') $(if $(JUDGE_URL),--judge_url '$(JUDGE_URL)') \
		$(if $(JUDGE_MODEL),--judge_model '$(JUDGE_MODEL)') $(if $(JUDGE_TIMEOUT),--judge_timeout $(JUDGE_TIMEOUT)) \
		$(QUEUES_FLAG) $(DEVICE_FLAG)

report: ## Compare every run in experiments/report/README.md with figures
	$(LAB) report $(QUEUES_FLAG)

speculative: ## Speculative decoding: DRAFT= run drafts for TARGET= run (K=4): acceptance, tok/s vs target alone
	$(LAB) speculative '$(DRAFT)' '$(TARGET)' $(if $(K),--k $(K)) $(QUEUES_FLAG) $(DEVICE_FLAG)

interpret: ## Attention, head scores, neurons, ablations, logit lens of MODEL -> its interp/ (DEVICE=)
	$(LAB) interpret '$(MODEL)' $(QUEUES_FLAG) $(DEVICE_FLAG)

interpret-compare: ## GPT vs LLaMA page in experiments/report/interp/ (GPT=, LLAMA=: two experiment names)
	$(LAB) interpret-compare '$(GPT)' '$(LLAMA)' $(QUEUES_FLAG) $(DEVICE_FLAG)

interpret-timeline: ## Head scores, in-context score, loss by position of every checkpoint of MODEL (all done runs without it)
	$(LAB) interpret-timeline $(if $(MODEL),--model '$(MODEL)') $(QUEUES_FLAG) $(DEVICE_FLAG)

# Fine-tuning on instructions

data-instruct: ## Download TinyStories-Instruct into LitGPT's JSON instruction format (data/instruct/tinystories)
	$(LAB) data-instruct --source tinystories --data_dir $(DATA_DIR)

data-instruct-sample: ## The offline instruction set from the bundled sample (data/instruct/sample)
	$(LAB) data-instruct --source sample --data_dir $(DATA_DIR)

finetune: ## Fine-tune MODEL= run with LitGPT: DATA=sample|tinystories|file METHOD=lora|full (LR=, ARGS=)
	$(LAB) finetune '$(MODEL)' --data '$(DATA)' --method $(METHOD) $(if $(LR),--lr $(LR)) --args='$(ARGS)' \
		--data_dir $(DATA_DIR) $(QUEUES_FLAG)

# Release

export: ## Export MODEL (a run, or a fine-tune's folder) to its hf/ folder for transformers, with a parity check
	$(LAB) export '$(MODEL)' $(QUEUES_FLAG) $(DEVICE_FLAG)

gguf: ## GGUF file for llama.cpp of MODEL (QUANT=f32|f16|q8_0) -> its gguf/, with a parity record (make install-gguf)
	$(LAB) gguf '$(MODEL)' --quant $(QUANT) $(QUEUES_FLAG)

serve: ## OpenAI-compatible server (llama.cpp) on 127.0.0.1:PORT for MODEL's GGUF file (QUANT=, PORT=8000)
	$(LAB) serve '$(MODEL)' --port $(PORT) --quant $(QUANT) $(QUEUES_FLAG)

publish: ## Upload MODEL's hf/ folder to the Hugging Face Hub: REPO=your-name/repo (needs a token)
	$(LAB) publish '$(MODEL)' '$(REPO)' $(QUEUES_FLAG)

# Benchmarks

bench: data-sample ## Tokens/s, MFU, memory: litgpt pretrain vs a bare loop (MODEL=a,b STEPS= PRECISION= DEVICE=)
	$(LAB) bench $(BENCH_FLAGS) $(if $(PRECISION),--precision $(PRECISION))

bench-sweep: data-sample ## Precision x micro batch sweep per variant on this device (MODEL=a,b STEPS= DEVICE=)
	$(LAB) bench-sweep $(BENCH_FLAGS)

bench-generate: data-sample ## Greedy tokens/s: LitGPT, transformers, llama.cpp f32 and q8_0 (MODEL=a,b; random weights)
	$(LAB) bench-generate $(if $(MODEL),--model '$(MODEL)') --data_dir $(DATA_DIR) --out_dir $(BENCH_OUT) $(QUEUES_FLAG)

bench-data: ## Token-file encoding throughput, 1 thread vs all cores, on the sample
	$(LAB) bench-data

step-memory: data-sample ## Peak memory of each config's real training step (MODEL=a,b DEVICE= DEVICES=N STRATEGY=ddp|fsdp)
	$(LAB) step-memory $(if $(MODEL),--models '[$(MODEL)]') $(DEVICE_FLAG) --data_dir $(DATA_DIR) $(QUEUES_FLAG) \
		$(if $(DEVICES),--devices $(DEVICES)) $(if $(STRATEGY),--strategy $(STRATEGY))

gpu-check: data-sample ## One-command check of a GPU box: precision, speed, MFU, memory, every tool on the device (DEVICE=)
	$(LAB) gpu-check $(DEVICE_FLAG) --data_dir $(DATA_DIR) --out_dir $(BENCH_OUT)
