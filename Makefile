# medkd: `make demo` (set up + the whole job on the sample data), `make test` (set up + the test suite).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
OUT    ?= out
MEDKD  := $(BIN)/medkd

.PHONY: install demo test bench clean

install: $(VENV)/.installed

# torch's exact CPU build is pinned in requirements/torch.txt (one place); pyproject only constrains the range. The
# extras install under the same pins (-c): nnunetv2 pulls torchvision, which must not bring another torch.
$(VENV)/.installed: pyproject.toml requirements/torch.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -r requirements/torch.txt
	$(BIN)/python -m pip install -q --disable-pip-version-check -c requirements/torch.txt -e '.[dev,deploy,nnunet]'
	touch $@

demo: install
	$(MEDKD) preprocess sample_data -o $(OUT)/data --size 64 --overwrite
	$(MEDKD) train-teacher $(OUT)/data -o $(OUT)/teacher --overwrite
# The student alone and the distilled student train side by side, one core each, at equal budget: the alone
# student gets the distilled one's 106 optimizer steps per epoch (the sample data's 842 train slices in batches of
# 8: the default recipe's teacher supervises every train image).
	OMP_NUM_THREADS=1 $(MEDKD) distill $(OUT)/data -o $(OUT)/student --scales none --no-pmd --steps-per-epoch 106 --overwrite -q & pid=$$!; \
	OMP_NUM_THREADS=1 $(MEDKD) distill $(OUT)/data -o $(OUT)/distilled --teacher $(OUT)/teacher --overwrite; rc=$$?; \
	wait $$pid && exit $$rc
	$(MEDKD) evaluate $(OUT)/student $(OUT)/distilled --data $(OUT)/data --split val
	$(MEDKD) evaluate $(OUT)/teacher $(OUT)/student $(OUT)/distilled --data $(OUT)/data --split test --overlays $(OUT)/overlays
	$(MEDKD) predict $(OUT)/distilled sample_data/imagesTr/spleen_001.nii.gz sample_data/dicom/spleen_000 -o $(OUT)/predictions --overwrite
	$(MEDKD) export $(OUT)/distilled -o $(OUT)/distilled.onnx --overwrite
	$(MEDKD) predict $(OUT)/distilled.onnx sample_data/imagesTr/spleen_001.nii.gz -o $(OUT)/predictions-onnx --overwrite
# the quick ablation in two shards side by side (one core each); --report-only then prints its table
	rm -rf $(OUT)/ablate
	OMP_NUM_THREADS=1 $(MEDKD) ablate $(OUT)/data --teacher $(OUT)/teacher -o $(OUT)/ablate --preset quick --shard 1/2 -q & pid=$$!; \
	OMP_NUM_THREADS=1 $(MEDKD) ablate $(OUT)/data --teacher $(OUT)/teacher -o $(OUT)/ablate --preset quick --shard 2/2 -q; rc=$$?; \
	wait $$pid && exit $$rc
	$(MEDKD) ablate $(OUT)/data --teacher $(OUT)/teacher -o $(OUT)/ablate --preset quick --report-only

test: install
	$(BIN)/lint-imports
	$(BIN)/python -m pytest

bench: install
	cd benchmarks && ../$(BIN)/python bench_models.py
	cd benchmarks && ../$(BIN)/python bench_distill.py
	cd benchmarks && ../$(BIN)/python bench_stats.py
	cd benchmarks && ../$(BIN)/python bench_deploy.py

clean:
	rm -rf $(OUT) .pytest_cache
