# The two commands a newcomer needs:
#   make lab    set everything up, then open JupyterLab on notebooks/ (the default model is
#               the embedded synthetic one; pass MODEL=path.gguf to use a real file)
#   make test   set everything up, then run the whole test suite (unit tests and nbval)
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: lab test setup
setup:
	@VENV=$(VENV) scripts/setup.sh

# JupyterLab refuses to start as root (containers, CI boxes) unless told it may.
ROOT_FLAG := $(if $(filter 0,$(shell id -u)),--allow-root,)

lab: setup
	RWKVLAB_MODEL=$(MODEL) $(VENV)/bin/jupyter lab --notebook-dir=notebooks $(ROOT_FLAG)

test: setup
	$(PY) -m pytest -q --nbval --nbval-current-env --nbval-sanitize-with notebooks/sanitize.cfg $(PYTEST_ARGS)
