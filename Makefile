# reclip — two commands from nothing: `make reproduce` (the main job) and `make test`.
# Python 3.11 + pip is all that is needed; everything else goes into .venv.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
PROFILE ?= toy
DATASET ?=
DEVICE ?= auto
PYTEST_ARGS ?=

.PHONY: venv test reproduce notebooks spread toy-world toy-clip bench clean-venv

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch/torchvision are pinned in pyproject.toml (2.14.1 / 0.29.1).
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

venv: $(VENV)/.installed

# The unit tests, then nbval: the committed notebooks are re-executed (toy profile). With
# --nbval-lax every cell must run without error and the cells marked `# NBVAL_CHECK_OUTPUT` (the
# outputs that are the same on every CPU) must reproduce their committed outputs; figures, timings
# and paths are not compared. Last, tests/test_toy_results.py checks every number the notebooks
# wrote against the committed tables within the spread `make spread` measured. The notebooks write
# into a temporary RECLIP_RESULTS tree: a test run neither overwrites the committed results/ nor
# reuses runs cached there (it trains from scratch, as CI does).
NBVAL_ARGS ?= --nbval-lax --nbval-current-env --nbval-sanitize-with notebooks/nbval_sanitize.cfg --nbval-cell-timeout=1200
test: venv
	@tmp=$$(mktemp -d -t reclip-test-results.XXXXXX); \
	RECLIP_RESULTS=$$tmp RECLIP_REQUIRE_RESULTS=1 $(PY) -m pytest $(PYTEST_ARGS) tests notebooks $(NBVAL_ARGS); rc=$$?; \
	rm -rf "$$tmp"; exit $$rc

reproduce: venv
	$(PY) -m reclip_core.reproduce --profile $(PROFILE) --device $(DEVICE) $(if $(DATASET),--dataset $(DATASET),)

# The toy worlds and the toy CLIPs. The weights are committed with their sha256, so `make
# reproduce` never retrains; these targets rebuild them (about 13 min each on 2 free cores, bf16
# autocast; the third is the biased recipe's second seed; the known-answer world's CLIP, patch 4
# with region-caption pairs, 21 min).
toy-world: venv
	$(PY) -m data_prep.toyworld --preset biased
	$(PY) -m data_prep.toyworld --preset uniform
	$(PY) -m data_prep.toyworld --preset known

toy-clip: toy-world
	$(PY) -m data_prep.pretrain_toy_clip --preset biased
	$(PY) -m data_prep.pretrain_toy_clip --preset uniform
	$(PY) -m data_prep.pretrain_toy_clip --preset biased --seed 1 --out reclip_core/pretrained/toy_clip_biased_seed1
	$(PY) -m data_prep.pretrain_toy_clip --preset known --config reclip_core/configs/toy_clip_known.json \
		--batch-size 64 --steps 1400 --region-weight 1.0

# Re-execute the notebooks in place so their committed outputs (checked by nbval) are refreshed.
notebooks: venv
	$(PY) -m reclip_core.reproduce --profile toy --inplace

# The toy reproduction under eight CPU kernel/thread settings and over three seeds:
# results/toy/spread.{csv,md} (about 95 min on 2 cores; the runs go to work/spread/).
spread: venv
	$(PY) -m reclip_core.spread

bench: venv
	$(PY) -m benchmarks.run

clean-venv:
	rm -rf $(VENV)
