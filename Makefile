# The two commands of the README:
#   make dev    start the service on http://127.0.0.1:3000 (DynamoDB Local, local Stripe simulator)
#   make test   install everything and run every check and test
# Each one installs what it needs itself (a venv in .venv, SAM CLI in .venv-sam, DynamoDB Local in .cache).

PYTHON ?= python3.11
VENV := .venv
SAMVENV := .venv-sam
CKVVENV := .venv-checkov
PY := $(VENV)/bin/python
export SAM_CLI_TELEMETRY := 0
export AWS_DEFAULT_REGION ?= us-east-1

.PHONY: dev test install lint typecheck template-lint built-imports pytest bench soak clean layer-lock

$(VENV)/.installed: pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "$(PYTHON) not found; run: make PYTHON=python3 ..."; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

# SAM CLI pins its own boto3 and friends, so it lives in a venv of its own.
$(SAMVENV)/.installed:
	$(PYTHON) -m venv $(SAMVENV)
	$(SAMVENV)/bin/python -m pip install --quiet --upgrade pip
	$(SAMVENV)/bin/python -m pip install --quiet 'aws-sam-cli>=1.130'
	touch $@

# checkov too: its own pins would fight the dev venv's.
$(CKVVENV)/.installed:
	$(PYTHON) -m venv $(CKVVENV)
	$(CKVVENV)/bin/python -m pip install --quiet --upgrade pip
	$(CKVVENV)/bin/python -m pip install --quiet 'checkov>=3.3,<4'
	touch $@

.cache/dynamodb-local/DynamoDBLocal.jar: | $(VENV)/.installed
	$(PY) -c 'from user_credits_dev.dynamodb_local import ensure_jar; print(ensure_jar())'

install: $(VENV)/.installed $(SAMVENV)/.installed $(CKVVENV)/.installed .cache/dynamodb-local/DynamoDBLocal.jar

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check shared devtools client functions tests benchmarks

typecheck: $(VENV)/.installed
	$(VENV)/bin/mypy shared devtools client

template-lint: $(VENV)/.installed $(SAMVENV)/.installed $(CKVVENV)/.installed
	$(VENV)/bin/cfn-lint template.yaml
	AWS_ACCESS_KEY_ID=none AWS_SECRET_ACCESS_KEY=none $(SAMVENV)/bin/sam validate --lint --template template.yaml
	$(CKVVENV)/bin/checkov --config-file .checkov.yaml

# Lambda's Python for the layer build and the import check: on PATH, else pyenv's (this machine image has
# it there); nothing here downloads an interpreter.
PY313 ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.13*/bin/python3.13) $(shell command -v python3.13))
BUILT := .aws-sam-check
SAM_BUILD = AWS_ACCESS_KEY_ID=none AWS_SECRET_ACCESS_KEY=none PYTHON="$(PY313)" PATH="$(dir $(PY313)):$$PATH" \
	$(SAMVENV)/bin/sam build --base-dir .

# `sam build` as deployed (arm64), and an x86_64 build of the same template that this machine can run:
# every function is imported from it with python3.13, only its folder and the layer on the path.
built-imports: $(SAMVENV)/.installed
	@test -n "$(PY313)" || { echo "python3.13 not found: put it on PATH or pass PY313=/path/to/python3.13"; exit 1; }
	rm -rf $(BUILT)/arm64 $(BUILT)/x86_64 && mkdir -p $(BUILT)
	$(SAM_BUILD) --template template.yaml --build-dir $(BUILT)/arm64 >$(BUILT)/arm64.log 2>&1 \
		|| { cat $(BUILT)/arm64.log; exit 1; }
	sed 's/arm64/x86_64/g' template.yaml > $(BUILT)/template-x86_64.yaml
	LAYER_PLATFORM=manylinux2014_x86_64 $(SAM_BUILD) --template $(BUILT)/template-x86_64.yaml \
		--build-dir $(BUILT)/x86_64 >$(BUILT)/x86_64.log 2>&1 || { cat $(BUILT)/x86_64.log; exit 1; }
	$(PY313) -I devtools/user_credits_dev/built_imports.py $(BUILT)/x86_64 --runs 1

# Re-resolve the layer's pinned dependencies (with hashes) after changing shared/requirements.txt.
layer-lock:
	@test -n "$(PY313)" || { echo "python3.13 not found"; exit 1; }
	rm -rf $(BUILT)/lockvenv && $(PY313) -m venv $(BUILT)/lockvenv
	$(BUILT)/lockvenv/bin/pip install --quiet pip-tools
	cd shared && ../$(BUILT)/lockvenv/bin/pip-compile --quiet --generate-hashes --strip-extras --no-header \
		--allow-unsafe --no-emit-index-url --no-emit-find-links requirements.txt -o requirements.lock

# Two workers: much of the suite waits on DynamoDB Local and subprocesses, so 2 cores give ~1.7x.
pytest: install
	$(VENV)/bin/pytest -q -n 2 $(PYTEST_ARGS)

test: install lint typecheck template-lint built-imports pytest

dev: $(VENV)/.installed
	$(VENV)/bin/user-credits dev

bench: install built-imports
	$(PY) -m benchmarks.run
	$(PY) -m benchmarks.sweep
	$(PY313) -I devtools/user_credits_dev/built_imports.py $(BUILT)/x86_64 --runs 5 \
		| tee benchmarks/results/built_imports.json

# The property suites for longer (about 8 minutes): 4 minutes of stateful model checking with new
# seeds, then the hostile-input fuzzing and schemathesis with the soak profile.
soak: install
	SOAK_SECONDS=$${SOAK_SECONDS:-240} HYPOTHESIS_PROFILE=soak $(VENV)/bin/pytest -q -s --timeout 1800 \
		tests/reliability/test_model.py $(PYTEST_ARGS)
	HYPOTHESIS_PROFILE=soak $(VENV)/bin/pytest -q --timeout 1800 --hypothesis-show-statistics \
		tests/reliability/test_hostile_input.py tests/reliability/test_schemathesis.py $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) $(SAMVENV) $(CKVVENV) .cache .pytest_cache .mypy_cache .ruff_cache $(BUILT)
