# The two commands of the README: `make run` (install + start the studio on the trained toy default) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 7860
ARGS ?=

.PHONY: install run test browser bench clean comfyui-env

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch pinned first: the CPU build on this machine's disk (an unpinned torch pulls a CUDA build)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e ".[test]"
	touch $@

# Debian's Chromium for the browser tests (playwright drives it through executable_path; no browser download).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -q && $$SUDO apt-get install -y -q chromium; }

run: install
	$(PY) app.py --host $(HOST) --port $(PORT) $(ARGS)

test: install browser
	OMP_WAIT_POLICY=PASSIVE $(PY) -m pytest -q

# ComfyUI's own venv for the ComfyUI tests, cached outside the clone (built once, ~4 min; `make test` builds it too)
comfyui-env: install
	$(PY) tests/comfyui_env.py

bench: install
	$(PY) bench/run_all.py

clean:
	rm -rf $(VENV) .pytest_cache
