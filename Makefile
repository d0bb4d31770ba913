# The two README commands: `make quickstart` and `make test`. Both install what they need first
# (a virtualenv in .venv, the torch pair this machine's mirror serves, the package, Fashion-MNIST).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch/torchvision pair; override e.g. `make TORCH="torch torchvision" quickstart` on a GPU machine
TORCH ?= torch==2.14.1 torchvision==0.29.1
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
QUICKSTART := experiment=quickstart attack=badnet,blended defense=none,otbr,clp

.PHONY: install fashion-mnist quickstart test
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

fashion-mnist:
	@test -f $(FMNIST) || { echo "Installing Fashion-MNIST (Debian package dataset-fashion-mnist)"; \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; }

quickstart: install fashion-mnist
	$(PY) run.py -m $(QUICKSTART)

test: install fashion-mnist
	$(PY) -m pytest -q
