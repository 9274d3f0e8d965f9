"""The console's replay jobs: a replay started from a browser outlives the request, and the process."""

from __future__ import annotations

import subprocess
import sys
import textwrap

# A process whose main thread starts a console replay and ends at once. The replay goes on after the
# main thread is gone (the interpreter is shutting down), and only then marks its rows.
SHUTDOWN_DURING_A_REPLAY = textwrap.dedent(
    """
    import threading
    import time

    from eventhandler.console.jobs import JobBoard
    from eventhandler.replay import ReplayReport

    def run(job):
        threading.main_thread().join()
        time.sleep(0.5)  # the chunk being published when the shutdown began
        print("rows marked", flush=True)
        return ReplayReport()

    JobBoard().start("console:admin", 1, run)
    """
)


def test_an_interpreter_shutdown_waits_for_a_console_replay_to_mark_its_rows() -> None:
    finished = subprocess.run(
        [sys.executable, "-c", SHUTDOWN_DURING_A_REPLAY], capture_output=True, text=True, timeout=60
    )
    assert finished.returncode == 0, finished.stderr
    assert finished.stdout == "rows marked\n"
