"""bot/loading.py: start-up work in a thread the process does not wait for. The model load itself is exercised
by the daemon's tests (tests/test_line_restarts.py stops one while it loads); here, a load that never ends."""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest

from bot.loading import in_thread, still_running
from tests.support.repo import REPO


async def test_the_result_or_the_error_of_the_work_comes_back_and_the_thread_is_then_forgotten():
    assert await in_thread(sum, [1, 2, 3], name="bunshin-test-sum") == 6
    with pytest.raises(ZeroDivisionError):
        await in_thread(lambda: 1 / 0, name="bunshin-test-error")
    assert still_running() == []


async def test_the_work_runs_in_one_thread_that_outlives_it():
    """A slot engine built in a thread that then ended stepped ten times slower on a CPU: the thread is kept."""
    first = await in_thread(threading.current_thread, name="bunshin-test-first")
    second = await in_thread(threading.current_thread, name="bunshin-test-second")
    assert first is second and first is not threading.current_thread() and first.daemon
    assert first.is_alive()


def test_work_that_never_ends_does_not_keep_the_process_from_exiting():
    """asyncio.to_thread's pool would be joined when asyncio.run returns: the process would wait for the load."""
    program = """
import asyncio, threading
from bot.loading import in_thread, still_running

async def main():
    never = threading.Event()
    try:
        await asyncio.wait_for(in_thread(never.wait, name="bunshin-load"), 0.2)
    except asyncio.TimeoutError:
        pass
    print("left running:", still_running(), flush=True)

asyncio.run(main())
"""
    done = subprocess.run([sys.executable, "-c", program], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "left running: ['bunshin-load']\n"
