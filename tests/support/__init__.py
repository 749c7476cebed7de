"""What several test files (and the bench/ scripts) share: fakes of the platforms' far sides and helpers that
drive the real programs. Nothing here is a test; test files import from here, never from each other.

    repo.py             the repo as a user has it: REPO, EXAMPLES, run_cli, write_toml
    daemon.py           `python -m bot` as a real process on a tiny model, talked to through its console
    fake_discord.py     Discord's REST API and gateway on loopback, and gateway payloads as Discord sends them
    fake_line_api.py    LINE's Messaging API on loopback, and webhooks signed as LINE signs them
    webhook_load.py     load on the LINE webhook: a plan of events, an open-loop sender, the exactly-once count
    synthetic_chats.py  chats with speakers whose styles are known, for the eval instrument
    leaky_chats.py      a LINE export that repeats itself in every way a blind test can leak through
    exact_interval.py   scipy's exact binomial interval, the reference for the blind test's verdict
    adversarial_text.py runs of digits and address words that a backtracking redaction rule would choke on
    real_base.py        Gemma 3 270M (a real pretrained base) the way `finetune get-base` gets it, cached

Fixtures several files use are registered in tests/conftest.py (e.g. `fake_discord`), not imported from here:
a fixture imported by name shadows the test's argument and pytest cannot tell it is one.

How `tests.support` is found, the same way under pytest and in a bench script:
- There is deliberately no tests/__init__.py. With one, pytest's default import mode would import every test
  module as `tests.test_x` and conftest.py as `tests.conftest`, and the `from conftest import ...` lines in
  the test files would stop working. Without it, pytest puts tests/ on sys.path (so `conftest` imports) and
  `tests` is a namespace package wherever the repo root is on sys.path.
- The repo root is put on sys.path by pytest itself (`pythonpath = ["."]` in pyproject.toml), and by each
  bench script (`sys.path.insert(0, REPO)`, which they need for `bot` and `finetune` anyway). Then
  `from tests.support.fake_line_api import ...` works in both, and tests/ itself is never put on sys.path
  by a script (it would make every test module importable as a top-level name).
- Modules here import each other relatively (`from .fake_line_api import ...`), so they do not depend on
  the name they were imported under.
"""
