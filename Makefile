# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
# Both create .venv (pinned by requirements*.txt) when it is missing or out of date.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Demo settings (override: make demo DEMO_ARGS="--train-studies 60")
DEMO_ARGS ?=

.PHONY: venv test demo keypoints lint kernel clean

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

demo: $(STAMP)
	$(PY) -m kernel_src.demo $(DEMO_ARGS)

# Stage 1 only: phantom, cache, the four keypoint families on the demo folds, held-out table
keypoints: $(STAMP)
	$(PY) -m kernel_src.demo --until stage1_table $(DEMO_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

kernel: $(STAMP)
	$(PY) build_kernel.py

clean:
	rm -rf dist runs data/demo
