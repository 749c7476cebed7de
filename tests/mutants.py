"""The second half of `make mutants` (docs/mutation.md): each mutant that `mutmut run` left alive is run again
against every test of its module's selection below, and what still survives is listed with its diff.

Why a second look: for each mutant mutmut runs only the tests that called the mutated function while it
recorded them, and a call made while a module-scoped fixture is set up is recorded against the first test
that used the fixture only. tests/test_scoring.py scores its synthetic systems once per module, so a
mutant of the scoring was run against one shape check and never against the tests that read the scores:
reported alive, it is killed here. A mutant alive after this is one that no test of its module catches.

    python tests/mutants.py [MODULE ...] [--jobs N]    # after `mutmut run`; MODULE as in MODULES, all by default

Not a test module (pytest collects test_*.py only). Run from the repository root, where mutants/ is.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# The modules where a silent bug loses or leaks data, each with the tests that check it (the fast and the
# teeth-first ones first: `-x` stops at the first failure). Their union is [tool.mutmut]'s test selection; with
# BUNSHIN_MUTANTS_MODULE set (make mutants MODULE=...), tests/conftest.py runs only the module's own.
MODULES = {
    "bot.inbox": ["tests/test_teeth_inbox.py", "tests/test_inbox.py", "tests/test_damaged_rows.py",
                  "tests/test_discord_adapter.py"],
    "bot.dispatcher": ["tests/test_teeth_dispatcher.py", "tests/test_discord_adapter.py", "tests/test_line_adapter.py"],
    "bot.api_request": ["tests/test_teeth_api_request.py", "tests/test_teeth_api.py", "tests/test_api.py", "tests/test_api_bad_input.py"],
    "bot.http_input": ["tests/test_http_input.py", "tests/test_api_bad_input.py", "tests/test_line_webhook_input.py", "tests/test_teeth_api.py"],
    "finetune.redact": ["tests/test_teeth_redact.py", "tests/test_redact.py"],
    "finetune.scoring": ["tests/test_teeth_scoring.py", "tests/test_scoring.py"],
    "adapters.line": ["tests/test_teeth_line.py", "tests/test_line_adapter.py", "tests/test_line_faults.py", "tests/test_line_names.py",
                      "tests/test_secrets_in_logs.py", "tests/test_line_webhook_input.py"],
    "adapters.line_api": ["tests/test_teeth_line.py", "tests/test_line_faults.py", "tests/test_line_adapter.py", "tests/test_line_names.py"],
}


def test_files(module: str) -> set[str]:
    """The test files of a module's selection (its --deselect arguments left out)."""
    args = MODULES[module]
    return {arg for i, arg in enumerate(args) if arg.endswith(".py") and (i == 0 or args[i - 1] != "--deselect")}


RECHECK_TIMEOUT_S = 900  # a mutant that hangs its tests (a loop that never ends) is caught by the timeout


def mutmut_config() -> dict:
    try:
        import tomllib  # novermin: guarded, tomli below on 3.10
    except ModuleNotFoundError:
        import tomli as tomllib
    return tomllib.loads(Path("pyproject.toml").read_text(encoding="utf-8"))["tool"]["mutmut"]


def check_selection(config: dict) -> None:
    """MODULES and [tool.mutmut] name the same modules and tests, so the two lists cannot drift apart."""
    modules = {path.removesuffix(".py").replace("/", ".") for path in config["only_mutate"]}
    if modules != set(MODULES):
        raise SystemExit(f"error: [tool.mutmut] only_mutate has {sorted(modules)}, tests/mutants.py MODULES has "
                         f"{sorted(MODULES)}: make them the same")
    selection = set(config["pytest_add_cli_args_test_selection"])
    wanted = {arg for args in MODULES.values() for arg in args}
    if selection != wanted:
        raise SystemExit(f"error: [tool.mutmut] pytest_add_cli_args_test_selection and tests/mutants.py MODULES "
                         f"differ in {sorted(selection ^ wanted)}")


def mutmut(*args: str) -> str:
    mutmut_script = Path(sys.executable).parent / "mutmut"
    done = subprocess.run([str(mutmut_script), *args], capture_output=True, text=True, encoding="utf-8")
    if done.returncode != 0:
        raise SystemExit(f"error: mutmut {' '.join(args)} failed:\n{done.stdout}{done.stderr}")
    return done.stdout


def results() -> dict[str, str]:
    """mutmut's verdict for every mutant it has tried but not killed: name -> status."""
    found = {}
    for line in mutmut("results").splitlines():
        name, sep, status = line.strip().rpartition(": ")
        if sep:
            found[name] = status
    return found


def module_of(mutant: str) -> str:
    """bot.inbox.xǁInboxǁ_commit__mutmut_3 -> bot.inbox"""
    return mutant.rsplit(".", 1)[0]


def caught_by_module_tests(mutant: str) -> bool:
    """Runs the module's whole selection with the mutant in place (mutmut's trampolines read MUTANT_UNDER_TEST)."""
    mutants = Path("mutants").resolve()
    env = {**os.environ, "MUTANT_UNDER_TEST": mutant, "PYTHONPATH": str(mutants), "PY_IGNORE_IMPORTMISMATCH": "1"}
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-p", "no:randomly",
               *MODULES[module_of(mutant)]]
    try:
        done = subprocess.run(command, cwd=mutants, env=env, capture_output=True, text=True, encoding="utf-8",
                              timeout=RECHECK_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return True
    if done.returncode in (4, 5):  # a usage error, or no tests collected: the selection is wrong, not the mutant
        raise SystemExit(f"error: pytest could not run {command}:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return done.returncode != 0


def changed_lines(mutant: str) -> str:
    """The diff of a mutant, its - and + lines only."""
    diff = mutmut("show", mutant).splitlines()
    return "\n".join(line for line in diff if line[:1] in "-+" and not line.startswith(("---", "+++")))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("modules", nargs="*", metavar="MODULE", help=f"one of {', '.join(MODULES)} (default: all)")
    parser.add_argument("--jobs", type=int, default=2, help="rechecks at once (default 2)")
    args = parser.parse_args(argv)
    unknown = [m for m in args.modules if m not in MODULES]
    if unknown:
        parser.error(f"unknown module {', '.join(unknown)}; one of {', '.join(MODULES)}")
    check_selection(mutmut_config())
    if not Path("mutants").is_dir():
        raise SystemExit("error: no mutants/ here: run `mutmut run` (make mutants) from the repository root first")
    shutil.copytree("tests", "mutants/tests", dirs_exist_ok=True)  # the tests as they are now, as mutmut run copies them
    modules = args.modules or list(MODULES)
    alive = {name: status for name, status in results().items() if module_of(name) in modules}
    to_recheck = [name for name, status in alive.items() if status == "survived"]
    print(f"rechecking {len(to_recheck)} surviving mutant(s) against their module's whole selection", flush=True)
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        caught = dict(zip(to_recheck, pool.map(caught_by_module_tests, to_recheck), strict=True))
    for module in modules:
        mine = {name: status for name, status in alive.items() if module_of(name) == module}
        unchecked = sum(status == "not checked" for status in mine.values())
        # A mutant that made its tests run past mutmut's time limit (a loop that never ends) was noticed: not left.
        timeouts = sum(status == "timeout" for status in mine.values())
        left = [name for name, status in mine.items() if status not in ("not checked", "timeout") and not caught.get(name)]
        rechecked = sum(module_of(name) == module for name in caught)
        killed = sum(module_of(name) == module and hit for name, hit in caught.items())
        print(f"\n## {module}: {rechecked} survived mutmut, {killed} of them caught by the module's tests; "
              f"{timeouts} timed out; {len(left)} left"
              + (f"; {unchecked} not checked yet (make mutants MODULE={module})" if unchecked else ""))
        for name in left:
            print(f"\n### {name} ({mine[name]})\n{changed_lines(name)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
