# Two set-up commands work on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test lint bench env clean science science-lm science-views

# (Re)install when pyproject.toml changes; pip keeps its download cache in ~/.cache/pip,
# so a second fresh venv does not download torch again.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

env: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest

demo: $(STAMP)
	$(PY) -m kdcache.distill.demo

# Losses x 10 seeds from one digits cache, paired tests (README "Which method helps").
# Resumable: rerun to finish. SCIENCE_OUT=/some/dir make science to write elsewhere.
SCIENCE_OUT ?= runs/science
science: $(STAMP)
	$(PY) -m kdcache.distill.science --out $(SCIENCE_OUT)

# How many cached views a student needs under strong augmentation (README "How many views"):
# caches of 1-16 views, online KD as the upper bound, 5 seeds. Resumable: rerun to finish.
VIEWS_OUT ?= runs/science-views
VIEWS_EPOCHS ?= 5
VIEWS_MIXUP ?= pair
science-views: $(STAMP)
	nice $(PY) -m kdcache.distill.science_views --out $(VIEWS_OUT) --epochs $(VIEWS_EPOCHS) \
		--mixup-mode $(VIEWS_MIXUP) --figure docs/science-views.png

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

bench: $(STAMP)
	$(PY) bench/cache_read.py
	$(PY) bench/views.py
	$(PY) bench/precompute.py
	$(PY) bench/distill.py

clean:
	rm -rf $(VENV) runs .pytest_cache

# Token caches: a small GPT-2 teacher on the stdlib's docstrings, cached as top-k 16/64 and
# sampled-64, students with CE vs KD through `kdcache study`, 10 seeds, paired (README
# "Distilling a language-model student"). Resumable. SCIENCE_LM_OUT=/some/dir make science-lm
# to write elsewhere.
SCIENCE_LM_OUT ?= runs/science-lm
science-lm: $(STAMP)
	$(PY) -m kdcache.distill.science_lm --out $(SCIENCE_LM_OUT)
