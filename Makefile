# masksiam: `make demo` and `make test` each install what is missing first (idempotent).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU default for this machine kind; on a CUDA machine e.g.
#   make install TORCH="torch==2.11.0" TORCHVISION="torchvision==0.26.0" TORCH_INDEX=https://download.pytorch.org/whl/cu130
TORCH ?= torch==2.13.0
TORCHVISION ?= torchvision==0.28.0
TORCH_INDEX ?=
DATA ?= data
STAMP := $(VENV)/.installed-$(shell echo "$(TORCH) $(TORCHVISION)" | md5sum | cut -c1-8)
TESTDATA := .cache/testdata/pillow/.complete
# the start-up hook that makes `import torchvision` work without importing masksiam (masksiam/compat.py)
HOOK := $(VENV)/.torchvision-hook
PYTEST_ARGS ?=

.PHONY: install demo test test-fast bench data clean-venv

install: $(STAMP) $(HOOK) $(TESTDATA)

$(STAMP): requirements.txt setup.py tools/install_apt.sh
	tools/install_apt.sh
	[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip wheel setuptools
	$(PY) -m pip install -q $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX) --extra-index-url https://pypi.org/simple) "$(TORCH)"
	$(PY) -m pip freeze | grep -iE '^torch==' > $(VENV)/constraints.txt
	$(PY) -m pip install -q -c $(VENV)/constraints.txt $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX) --extra-index-url https://pypi.org/simple) "$(TORCHVISION)"
	$(PY) -m pip install -q -c $(VENV)/constraints.txt -r requirements.txt
	$(PY) -m pip install -q -c $(VENV)/constraints.txt --no-deps --no-build-isolation -e .
	$(PY) -c "import masksiam, torchvision, nvidia.dali, ffcv; print('masksiam installed: torch', __import__('torch').__version__, 'torchvision', torchvision.__version__)"
	rm -f $(VENV)/.installed-* && touch $@

# a fresh interpreter, not importing masksiam, must import torchvision and build a model
$(HOOK): masksiam/compat.py masksiam/__init__.py $(STAMP)
	$(PY) -c "from masksiam.compat import install_startup_hook; print('start-up hook:', install_startup_hook())"
	cd /tmp && $(abspath $(PY)) -c "import torchvision; torchvision.models.resnet18()"
	touch $@

$(TESTDATA): | $(STAMP)
	PY=$(PY) tools/fetch_testdata.sh .cache/testdata/pillow

data: install
	@[ -f $(DATA)/fashion-mnist/.complete ] || $(PY) convert.py fashion-mnist --out $(DATA)/fashion-mnist --force

demo: data
	@# resume=true: a second `make demo` finds the finished run and only re-evaluates it
	$(PY) train.py --config configs/demo_fmnist.yaml resume=true
	$(PY) -m eval.demo_report --run runs/demo

# both install DALI and FFCV first: there a failed import of either fails the suite (tests/conftest.py)
test test-fast: export MASKSIAM_REQUIRE_LOADERS = 1

# the whole suite (~10 min on 2 cores; GPU tests skip without CUDA); pytest fails when none ran
test: install
	$(PY) -m pytest -q $(PYTEST_ARGS) tests

# without the multi-process / signal tests (@pytest.mark.slow): the edit-test loop
test-fast: install
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS) tests

# the standard throughput comparison on the photos folder (~5 min on 2 cores): runs/bench/*.{json,md,png}
# and the numbers table in README.md
bench: install
	PY=$(PY) DATA=$(DATA) tools/bench.sh

clean-venv:
	rm -rf $(VENV)

# masksiam's SimCLR against the loop a lightly user writes (tools/vs_lightly.py), side by side; lightly
# is installed without its dependencies (it needs none beyond torch / torchvision for this loop)
LIGHTLY := lightly==1.6.0 lightly-utils==0.0.2 lightning-utilities==0.15.3 aenum==3.1.17
.PHONY: vs-lightly
vs-lightly: data
	$(PY) -c "import lightly" 2>/dev/null || $(PY) -m pip install -q --no-deps $(LIGHTLY)
	$(PY) tools/vs_lightly.py $(VS_ARGS)

# the science table on Fashion-MNIST (the papers' comparisons x kNN / linear / 10 % fine-tune vs random
# init and supervised, 3 seeds; ~2 h 40 min on 2 cores): runs/science/report.{md,png}. Not in `make test`.
.PHONY: science
science: data
	PY=$(PY) DATA=$(DATA) tools/science.sh
