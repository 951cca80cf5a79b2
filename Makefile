# dermlens developer entry points. `make serve` and `make test` are the README's two commands.
PYTHON ?= python3
VENV ?= .venv
CORE_VENV ?= .venv-core
HOST ?= 127.0.0.1
PORT ?= 8000
# Every pip install below takes the tested versions pinned in constraints.txt.

.PHONY: serve test test-all test-postgres install lint release release-eval release-ensemble release-choice release-student levers

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

## release: the whole release build, resumable (re-run the same command after an interruption):
## prepare HAM10000 + ISIC 2017, build their caches, train the lite0 member (resumes from last.ckpt) and export
## it as a candidate, build the lite0 + lite2 ensemble (release-ensemble), score both candidates on validation
## (release-choice), package the ensemble (the candidate validation chose), record its trust fit, evaluate.
RELEASE_CFG ?= src/dermlens/configs/release.yaml
BUNDLE ?= src/dermlens/models/release
LITE0_BUNDLE ?= runs/release/bundle
DATA ?= ../shared/data
DL = $(VENV)/bin/dermlens
release: $(VENV)/.installed
	test -f work/ham10000/manifest.csv || $(DL) data prepare --dataset ham10000 --root $(DATA)/ham10000 --out work/ham10000
	test -f work/isic2017/manifest.csv || $(DL) data prepare --dataset isic2017 --root $(DATA)/isic2017 --out work/isic2017 --split dataset
	$(DL) data cache work/ham10000 --height 192 --width 256 --color-constancy shades_of_gray
	$(DL) data cache work/isic2017 --height 192 --width 256 --color-constancy shades_of_gray
	test -f work/isic2017-holdout/manifest.csv || $(DL) data holdout work/isic2017 --out work/isic2017-holdout
	$(DL) train --config $(RELEASE_CFG)
	$(DL) export --run runs/release --manifest work/ham10000 --out $(LITE0_BUNDLE) --external work/isic2017-holdout
	$(MAKE) release-ensemble
	$(MAKE) release-choice CANDIDATES="lite0=$(LITE0_BUNDLE) ensemble=$(ENSEMBLE_BUNDLE)"
	rm -rf $(BUNDLE) && cp -r $(ENSEMBLE_BUNDLE) $(BUNDLE)
	# the same fit again (byte-identical trust.npz), run only for its report JSON
	$(DL) trust fit --bundle $(BUNDLE) --manifest work/ham10000 --external work/isic2017-holdout --out docs/results/trust_fit.json
	$(MAKE) release-eval

## release-ensemble: the release ensemble (configs/release_ensemble.yaml: the lite0 release run + lite2 on the
## same recipe, mean probability), resumable; exported with trust fitted on int8 and the ISIC 2017 hold-out.
ENSEMBLE_BUNDLE ?= runs/release-ensemble/bundle
release-ensemble: $(VENV)/.installed
	test -f work/isic2017-holdout/manifest.csv || $(DL) data holdout work/isic2017 --out work/isic2017-holdout
	$(DL) ensemble --recipe src/dermlens/configs/release_ensemble.yaml --bundle $(ENSEMBLE_BUNDLE)
	$(DL) monitor-reference --manifest work/ham10000 --model $(ENSEMBLE_BUNDLE)
	mkdir -p docs/results/choice
	cp runs/release-ensemble/ensemble.json docs/results/choice/ensemble_build.json
	cp runs/release/metrics_val.json docs/results/choice/lite0_training_val.json
	cp runs/release-ensemble/members/lite2/metrics_val.json docs/results/choice/lite2_training_val.json
	cp runs/release/logs/csv/metrics.csv docs/results/choice/lite0_training_log.csv
	cp runs/release-ensemble/members/lite2/logs/csv/metrics.csv docs/results/choice/lite2_training_log.csv

## release-student: distil the packaged ensemble into one lite0 student on the release recipe (8 epochs,
## resumable), export it like the lite0 candidate, score it on validation (release-choice), apply the release
## rule (the student ships by default if its int8 val BA is within 1 point of the ensemble's), time both.
STUDENT_BUNDLE ?= runs/student/bundle
release-student: $(VENV)/.installed
	test -f work/isic2017-holdout/manifest.csv || $(DL) data holdout work/isic2017 --out work/isic2017-holdout
	$(DL) distill --teacher $(BUNDLE) --export $(STUDENT_BUNDLE) --external work/isic2017-holdout \
	  trainer.time_budget_min=null trainer.max_epochs=8
	$(MAKE) release-choice CANDIDATES="student=$(STUDENT_BUNDLE)"
	$(DL) release choose --ensemble $(BUNDLE) --student $(STUDENT_BUNDLE) \
	  --out docs/results/choice/student_vs_ensemble.json
	$(VENV)/bin/python benchmarks/bench_ensemble.py --bundle $(STUDENT_BUNDLE) --ensemble $(BUNDLE) \
	  --json docs/results/bench_student_vs_ensemble.json

## release-choice: model choice on validation only (HAM10000 val and the ISIC 2017 hold-out, with and without
## metadata) for each candidate bundle in CANDIDATES (name=path); JSONs go to docs/results/choice/.
CANDIDATES ?= lite0=$(LITE0_BUNDLE) ensemble=$(ENSEMBLE_BUNDLE)
CHOICE = runs/choice
release-choice: $(VENV)/.installed
	mkdir -p docs/results/choice
	for c in $(CANDIDATES); do n=$${c%%=*}; b=$${c#*=}; \
	  $(DL) evaluate --manifest work/ham10000/manifest.csv --split val --model $$b --out $(CHOICE)/$$n/val && \
	  $(DL) evaluate --manifest work/ham10000/manifest.csv --split val --model $$b --no-metadata --out $(CHOICE)/$$n/val_no_metadata && \
	  $(DL) external --manifest work/isic2017-holdout/manifest.csv --split train --model $$b --out $(CHOICE)/$$n/holdout && \
	  $(DL) external --manifest work/isic2017-holdout/manifest.csv --split train --model $$b --no-metadata --out $(CHOICE)/$$n/holdout_no_metadata && \
	  cp $(CHOICE)/$$n/val/metrics.json docs/results/choice/$${n}_val.json && \
	  cp $(CHOICE)/$$n/val_no_metadata/metrics.json docs/results/choice/$${n}_val_no_metadata.json && \
	  cp $(CHOICE)/$$n/holdout/external.json docs/results/choice/$${n}_holdout.json && \
	  cp $(CHOICE)/$$n/holdout_no_metadata/external.json docs/results/choice/$${n}_holdout_no_metadata.json || exit 1; \
	done

## release-eval: score the bundle once on the held-out test splits, with and without metadata; record the
## results in its card and copy them to docs/results/ (the README's figures come from these files).
EVAL = runs/eval
release-eval: $(VENV)/.installed
	test -f work/ham-dm/manifest.csv || $(DL) data prepare --dataset ham10000 --root $(DATA)/ham10000 --out work/ham-dm --split dermamnist --no-cache
	$(DL) evaluate --manifest work/ham10000/manifest.csv --split test --model $(BUNDLE) --out $(EVAL)/ham_test
	$(DL) evaluate --manifest work/ham10000/manifest.csv --split test --model $(BUNDLE) --no-metadata --out $(EVAL)/ham_test_no_metadata
	$(DL) external --manifest work/isic2017/manifest.csv --split test --model $(BUNDLE) --out $(EVAL)/isic2017_test
	$(DL) external --manifest work/isic2017/manifest.csv --split test --model $(BUNDLE) --no-metadata --out $(EVAL)/isic2017_test_no_metadata
	$(DL) evaluate --manifest work/ham-dm/manifest.csv --split test --model $(BUNDLE) --no-metadata --exclude-train-of work/ham10000/manifest.csv --out $(EVAL)/dermamnist_test_unseen
	$(DL) bundle add-metrics test $(EVAL)/ham_test/metrics.json --bundle $(BUNDLE)
	$(DL) bundle add-metrics test_no_metadata $(EVAL)/ham_test_no_metadata/metrics.json --bundle $(BUNDLE)
	$(DL) bundle add-metrics isic2017_test $(EVAL)/isic2017_test/external.json --bundle $(BUNDLE)
	$(DL) bundle add-metrics isic2017_test_no_metadata $(EVAL)/isic2017_test_no_metadata/external.json --bundle $(BUNDLE)
	$(DL) bundle add-metrics dermamnist_test_unseen $(EVAL)/dermamnist_test_unseen/metrics.json --bundle $(BUNDLE)
	mkdir -p docs/results
	for d in ham_test ham_test_no_metadata dermamnist_test_unseen; do cp $(EVAL)/$$d/metrics.json docs/results/$$d.json; done
	for d in isic2017_test isic2017_test_no_metadata; do cp $(EVAL)/$$d/external.json docs/results/$$d.json; done
	cp $(BUNDLE)/card.json docs/results/release_card.json

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
