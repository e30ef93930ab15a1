# The two README commands (make serve, make test) plus bench and lint. Every install step lives here.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
HOST   ?= 127.0.0.1
PORT   ?= 8000
PYTEST_ARGS ?=
# podman builds and runs the images (runc: crun refuses this sandbox's cgroups), mmdebstrap makes their base
# (no registry), nginx balances the replicas of the scale-out test
IMAGE_APT_PACKAGES := podman mmdebstrap runc nginx
APT_PACKAGES := dataset-fashion-mnist chromium wrk $(IMAGE_APT_PACKAGES)
TORCH  := torch==2.13.0

.PHONY: serve test test-slow test-images bench lint system-deps image-deps image image-gpu default-model clean

$(PY):
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# Server only: onnxruntime (CPU build) and the web stack, never torch.
$(VENV)/.serve-installed: pyproject.toml | $(PY)
	$(PIP) install -q -e '.[cpu]'
	touch $@

# Everything the tests need: torch pinned to the CPU build on this machine's disk, then the extras.
$(VENV)/.test-installed: pyproject.toml | $(PY)
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -e '.[cpu,train,torch,dev,bulk]'
	touch $@ $(VENV)/.serve-installed

# Debian packages, installed when running as root with apt; without them their tests skip and say why.
define apt_install
	@missing=$$(for p in $(1); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done); \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	else echo "note: install $$missing (apt) for the tests that need them (they skip without them)"; fi
endef

# What the tests use: real data, a real browser, wrk, and podman, mmdebstrap, runc and nginx for the images.
system-deps:
	$(call apt_install,$(APT_PACKAGES))

image-deps:
	$(call apt_install,$(IMAGE_APT_PACKAGES))

# The images, with podman, from a Debian base made by mmdebstrap (no registry; docker/podman_build.py).
image: image-deps
	python3 docker/podman_build.py cpu

image-gpu: image-deps
	python3 docker/podman_build.py gpu

# Every image test, the GPU image's (about 1.6 GB of CUDA wheels, ~80 s to build here) included.
test-images: $(VENV)/.test-installed image-deps
	$(PY) -m pytest -q -m 'slow or not slow' tests/deploy

serve: $(VENV)/.serve-installed
	$(VENV)/bin/mae-serve --host $(HOST) --port $(PORT)

# pytest's exit 5 (no test ran) is a failure like any other non-zero status.
test: $(VENV)/.test-installed system-deps
	@$(PY) -m pytest -q $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: no test ran" >&2; fi; exit $$rc

test-slow: $(VENV)/.test-installed system-deps
	$(PY) -m pytest -q -m slow $(PYTEST_ARGS)

bench: $(VENV)/.test-installed system-deps
	$(PY) benchmarks/serve.py

lint: $(VENV)/.test-installed
	$(VENV)/bin/ruff check .

# Retrain the bundled default model from scratch (about 4 h on 2 CPU cores; see MODEL_CARD.md): 25 epochs of
# pretraining, 20 more from those weights, the linear probe, a 15-epoch fine-tune, export, the card's figures.
RUN := runs/continued
default-model: $(VENV)/.test-installed system-deps
	$(VENV)/bin/mae-train --config configs/pretrain_fmnist.toml
	$(VENV)/bin/mae-train --config configs/pretrain_fmnist_continue.toml \
		--init-from runs/default/pretrain/checkpoint-final.pth
	$(VENV)/bin/mae-probe --config configs/probe_fmnist_continue.toml
	$(VENV)/bin/mae-finetune --config configs/finetune_fmnist_continue.toml
	$(VENV)/bin/mae-export --checkpoint $(RUN)/probe/checkpoint-probe.pth \
		--classifier $(RUN)/finetune/checkpoint-last.pth --precision fp32,fp16,int8 \
		--name mae-vit-tiny-fmnist --no-weights --out service/default_model
	$(PY) -m training.model_card --run $(RUN) --model-dir service/default_model --out docs/model_card
	$(PY) benchmarks/knn_retrieval.py --record

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
