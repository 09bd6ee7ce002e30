# The two commands of the README:
#   make dev    start the service on http://127.0.0.1:3000 (DynamoDB Local, local Stripe simulator)
#   make test   install everything and run every check and test
# Each one installs what it needs itself (a venv in .venv, SAM CLI in .venv-sam, DynamoDB Local in .cache).

PYTHON ?= python3.11
VENV := .venv
SAMVENV := .venv-sam
PY := $(VENV)/bin/python
export SAM_CLI_TELEMETRY := 0
export AWS_DEFAULT_REGION ?= us-east-1

.PHONY: dev test install lint typecheck template-lint pytest bench soak clean

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

.cache/dynamodb-local/DynamoDBLocal.jar: | $(VENV)/.installed
	$(PY) -c 'from user_credits_dev.dynamodb_local import ensure_jar; print(ensure_jar())'

install: $(VENV)/.installed $(SAMVENV)/.installed .cache/dynamodb-local/DynamoDBLocal.jar

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check shared devtools client functions tests benchmarks

typecheck: $(VENV)/.installed
	$(VENV)/bin/mypy shared devtools client

template-lint: $(VENV)/.installed $(SAMVENV)/.installed
	$(VENV)/bin/cfn-lint template.yaml
	AWS_ACCESS_KEY_ID=none AWS_SECRET_ACCESS_KEY=none $(SAMVENV)/bin/sam validate --lint --template template.yaml

# Two workers: much of the suite waits on DynamoDB Local and subprocesses, so 2 cores give ~1.7x.
pytest: install
	$(VENV)/bin/pytest -q -n 2 $(PYTEST_ARGS)

test: install lint typecheck template-lint pytest

dev: $(VENV)/.installed
	$(VENV)/bin/user-credits dev

bench: install
	$(PY) -m benchmarks.run
	$(PY) -m benchmarks.sweep

# The property suites for longer (about 8 minutes): 4 minutes of stateful model checking with new
# seeds, then the hostile-input fuzzing and schemathesis with the soak profile.
soak: install
	SOAK_SECONDS=$${SOAK_SECONDS:-240} HYPOTHESIS_PROFILE=soak $(VENV)/bin/pytest -q -s --timeout 1800 \
		tests/reliability/test_model.py $(PYTEST_ARGS)
	HYPOTHESIS_PROFILE=soak $(VENV)/bin/pytest -q --timeout 1800 --hypothesis-show-statistics \
		tests/reliability/test_hostile_input.py tests/reliability/test_schemathesis.py $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) $(SAMVENV) .cache .pytest_cache .mypy_cache .ruff_cache
