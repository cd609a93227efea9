PYTHON ?= python3
PIP ?= $(PYTHON) -m pip

.PHONY: install system-deps demo lint test test-slow bench clean

# torch is installed first, pinned: it is the CPU build on the build machines'
# disk, and asking for it alone keeps pip from resolving a CUDA build.
install:
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e ".[dev,s3,ray]"

demo:
	tokshard demo --out demo-out

# ruff over everything; mypy over the package as it is imported (tokshard.*),
# laid out by symlinks because the design card's folders map onto one name.
TYPECHECK := build/typecheck
lint:
	ruff check .
	@rm -rf $(TYPECHECK) && mkdir -p $(TYPECHECK)/tokshard
	@for f in tokshard/*.py; do ln -s ../../../$$f $(TYPECHECK)/tokshard/; done
	@for d in pipeline tokenizers schemas jobs; do ln -s ../../../$$d $(TYPECHECK)/tokshard/$$d; done
	cd $(TYPECHECK) && mypy --config-file ../../pyproject.toml -p tokshard

# Headless Chromium renders `tokshard report` pages in the tests (Debian's package).
system-deps:
	@command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null)

test: system-deps
	pytest -q -n 2 --dist loadgroup -m "not slow"

test-slow:
	pytest -q -m slow

bench:
	$(PYTHON) bench/storage.py
	$(PYTHON) bench/codebook_prior.py
	$(PYTHON) bench/loader.py
	$(PYTHON) bench/convert.py
	$(PYTHON) bench/sources.py
	$(PYTHON) bench/fidelity.py
	$(PYTHON) bench/query.py
	$(PYTHON) bench/access.py
	$(PYTHON) bench/mixture.py
	$(PYTHON) bench/packing.py
	$(PYTHON) bench/grids.py

clean:
	rm -rf demo-out .pytest_cache .hypothesis build *.egg-info
