# dermlens developer entry points. `make serve` and `make test` are the README's two commands.
PYTHON ?= python3
VENV ?= .venv
CORE_VENV ?= .venv-core
HOST ?= 127.0.0.1
PORT ?= 8000
# Every pip install below takes the tested versions pinned in constraints.txt.

.PHONY: serve test test-all test-postgres install lint release levers sources levers-sources

$(CORE_VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(CORE_VENV)
	$(CORE_VENV)/bin/pip install -q --upgrade pip
	$(CORE_VENV)/bin/pip install -q -c constraints.txt ".[serve]"
	touch $@

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -c constraints.txt -e ".[dev]"
	touch $@

install: $(VENV)/.installed

## serve: install the torch-free runtime and serve the web page + API on the packaged model
serve: $(CORE_VENV)/.installed
	$(CORE_VENV)/bin/dermlens serve --host $(HOST) --port $(PORT)

## test: the fast lane (at most 5 minutes on 2 cores): everything but the `slow` and `release` tests
test: $(VENV)/.installed $(CORE_VENV)/.installed
	DERMLENS_CORE_PYTHON=$(abspath $(CORE_VENV))/bin/python $(VENV)/bin/python -m pytest -q -m "not slow and not release"

## test-all: the whole suite (CI runs it): also training, the browser, Ray, DDP and whole-split re-scoring
test-all: $(VENV)/.installed $(CORE_VENV)/.installed
	@command -v chromium >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null)
	DERMLENS_CORE_PYTHON=$(abspath $(CORE_VENV))/bin/python $(VENV)/bin/python -m pytest -q

## test-postgres: start a local PostgreSQL server (Debian package) and run the tests with it
test-postgres:
	eval "$$(bash .ci/postgres.sh)" && CI=true $(MAKE) test-all

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

## release: the one release build, resumable (re-run the same command after an interruption): prepare and cache
## HAM10000 + ISIC 2017, train the lite0 + lite2 members, build the ensemble bundle, distil the student, choose
## on validation, copy the chosen bundle into src/dermlens/models/release and read the test splits once
## (configs/release_build.yaml; RELEASE_ARGS="--recipe FILE" or training overrides change it).
RELEASE_ARGS ?=
DL = $(VENV)/bin/dermlens
release: $(VENV)/.installed
	$(DL) release build $(RELEASE_ARGS)

## levers: one-at-a-time ablations of the release recipe on a short fixed schedule (configs/levers.yaml),
## resumable; the val table goes to docs/results/levers.json. LEVERS="base image_only" trains only those;
## LEVER_ARGS="trainer.threads=1" lets two `make levers` share 2 cores.
LEVERS ?=
LEVER_ARGS ?=
levers: $(VENV)/.installed
	$(DL) data cache work/ham10000 --height 192 --width 256 --color-constancy none
	$(DL) data cache work/isic2017 --height 192 --width 256 --color-constancy none
	$(DL) data cache work/ham10000 --height 150 --width 200 --color-constancy shades_of_gray
	$(DL) data cache work/isic2017 --height 150 --width 200 --color-constancy shades_of_gray
	$(DL) release levers $(foreach l,$(LEVERS),--only $(l)) $(LEVER_ARGS) --out docs/results/levers.json

## sources: the three-clinic, eight-class model (configs/release_sources.yaml): prepares ISIC 2019-BCN, builds
## the caches, takes its starting weights from the derm7 ensemble in git history, trains (resumable) and
## exports the bundle to runs/release_sources/bundle.
DERM7 = work/init/derm7-0.1.0+3a64f8969a.pt
$(DERM7):
	mkdir -p work/init
	git show 4dfda74:src/dermlens/models/release/model.pt > $@
SOURCE_CACHE = --height 150 --width 200 --color-constancy shades_of_gray --fit crop
sources-data: $(VENV)/.installed
	test -f work/isic2019/manifest.csv || $(DL) data prepare --dataset isic2019 --root ../shared/data/isic2019 --out work/isic2019
	for d in ham10000 isic2017 isic2019; do $(DL) data cache work/$$d $(SOURCE_CACHE); done
	test -f work/isic2017-holdout/manifest.csv || $(DL) data holdout work/isic2017 --out work/isic2017-holdout
sources: sources-data $(DERM7)
	$(DL) train run --config release_sources.yaml
	$(DL) bundle export --run runs/release_sources --manifest work/ham10000 --external work/isic2017-holdout \
		--config src/dermlens/configs/export_sources.yaml --out runs/release_sources/bundle
## levers-sources: the levers of the three-clinic recipe (configs/levers_sources.yaml) -> docs/results/levers_sources.json
levers-sources: sources-data $(DERM7)
	for d in ham10000 isic2017 isic2019; do \
		$(DL) data cache work/$$d --height 150 --width 200 --color-constancy shades_of_gray --fit squash; \
		$(DL) data cache work/$$d --height 150 --width 200 --color-constancy none --fit crop; \
		$(DL) data cache work/$$d --height 195 --width 260 --color-constancy shades_of_gray --fit crop; done
	$(DL) release levers -r levers_sources.yaml $(foreach l,$(LEVERS),--only $(l)) $(LEVER_ARGS) --out docs/results/levers_sources.json
