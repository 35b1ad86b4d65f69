# Two entry points, each creating the virtual environment when it is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint fuzz mutation mutation-training mutation-training-save figures

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/transferkit demo --out runs/demo

test: $(STAMP)
	$(BIN)/python -m ruff check src tests benchmarks
	$(BIN)/python -m pytest -q

# The documented runs re-run and compared with the figures docs/BENCHMARKS.md gives for them (tests/test_doc_figures.py;
# about half an hour on 2 cores). Run it after a change that can move a figure, and re-run the doc where it fails.
figures: $(STAMP)
	$(BIN)/python -m pytest -q -m figures tests/test_doc_figures.py

# The readers and converters fuzzed with FUZZ_EXAMPLES random examples each (the suite runs a fixed set).
FUZZ_EXAMPLES ?= 2000
fuzz: $(STAMP)
	FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(BIN)/python -m pytest -q tests/test_readers_fuzz.py tests/test_convert_fuzz.py

# Mutation testing, one module at a time: make mutation MUTANTS='transferkit.weights.matching*'
# (no MUTANTS: every module configured in pyproject.toml). Slow; not part of `make test`.
MUTANTS ?=
mutation: $(STAMP)
	nice $(BIN)/mutmut run --max-children 1 $(MUTANTS)
	$(BIN)/mutmut results

# training/'s mutants, run with the training tests in a folder of their own (settings in
# tools/mutation-training/pyproject.toml): make mutation-training MUTANTS='transferkit.training.ema*'
# PYTHONPATH lets the runs that tests start as subprocesses import the mutated code too; the tests are
# copied, so that tests edited while it runs (hours) do not change it part way.
MUTATION_TRAINING := build/mutation-training
TRAINING_RESULTS := tools/mutation-training/results.json
mutation-training: $(STAMP)
	mkdir -p $(MUTATION_TRAINING)
	for d in src docs configs; do ln -sfn ../../$$d $(MUTATION_TRAINING)/$$d; done
	rm -rf $(MUTATION_TRAINING)/tests && cp -r tests $(MUTATION_TRAINING)/tests  # a copy: edits during a run stay out
	cp tools/mutation-training/pyproject.toml $(MUTATION_TRAINING)/
	$(BIN)/python tools/mutation_results.py restore $(TRAINING_RESULTS) $(MUTATION_TRAINING)/mutants
	# Stats (which tests reach which function) collected afresh, a few minutes: once, kept ones came back
	# empty and every mutant was marked "no tests".
	rm -f $(MUTATION_TRAINING)/mutants/mutmut-stats.json
	cd $(MUTATION_TRAINING) && PYTHONPATH=$(CURDIR)/$(MUTATION_TRAINING)/mutants/src OMP_NUM_THREADS=1 \
		nice ../../$(BIN)/mutmut run --max-children 2 $(MUTANTS)  # two mutants at a time, a thread each
	$(MAKE) mutation-training-save
	cd $(MUTATION_TRAINING) && ../../$(BIN)/mutmut results

# The results so far into tools/mutation-training/results.json (commit it): a run stopped part way goes
# on from them in a fresh clone. Run it after stopping a run with Ctrl-C.
mutation-training-save: $(STAMP)
	$(BIN)/python tools/mutation_results.py save $(TRAINING_RESULTS) $(MUTATION_TRAINING)/mutants
