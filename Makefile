# vitscale: every target sets up what it needs, idempotently.
PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PIP := $(VPY) -m pip install --progress-bar off -c constraints.txt

.PHONY: venv test dry-run bench clean

venv: $(STAMP)

# torch first (deepspeed's setup imports it), deepspeed without build isolation, then the rest.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) setuptools wheel
	$(PIP) torch
	$(PIP) --no-build-isolation deepspeed
	$(VPY) -c 'import tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]; print("\n".join(p["dependencies"] + p["optional-dependencies"]["test"]))' > $(VENV)/requirements.txt
	$(PIP) -r $(VENV)/requirements.txt
	# For tests only, beside the venv, never on its path: timm's modules, to check our converted
	# weights against (tests/model/test_timm_logits.py). torchvision (which timm imports) is a
	# CUDA build here whose compiled ops do not load beside the CPU torch; anything that merely
	# tried to import it from the venv would fail, so it stays out.
	$(PIP) --no-deps --target $(VENV)/timm-only timm torchvision
	touch $(STAMP)

test: $(STAMP)
	$(VPY) -m pytest tests

dry-run: $(STAMP)
	$(VPY) launch/pretrain.py --dry-run

bench: $(STAMP)
	@for b in benchmarks/*.py; do echo "== $$b"; $(VPY) $$b || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache
