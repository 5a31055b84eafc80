"""The CLI's commands as child processes of the UI: training, comparisons, evaluation, merging and
export run as `python -m peftkit.cli ...`, so the page stays responsive, a crash in one cannot take
the UI down, and each run is exactly what the same command typed in a terminal would do.

Stop sends SIGINT to the child's process group, as Ctrl-C at a terminal would: Trainer stops where
it is, and the checkpoints already in the run folder stay (each one is renamed into place only
once complete, training/checkpoints.py), so `peftkit train --resume` continues from the newest.
A child that has not ended after `STOP_GRACE_SECONDS` is killed, which loses nothing more."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from peftkit.ui.workspace import WorkspaceError

STOP_GRACE_SECONDS = 30.0
TAIL_BYTES = 64 * 1024  # of a log, what the page reads back


def cli_command(*arguments: str) -> list[str]:
    """A peftkit command line run by this interpreter (the UI's own environment)."""
    return [sys.executable, "-m", "peftkit.cli", *arguments]


@dataclass
class Job:
    """One child process, its command and its log file."""

    command: list[str]
    log: Path
    process: subprocess.Popen
    started: float = field(default_factory=time.time)
    ended: float | None = None
    stop_requested: bool = False

    @property
    def running(self) -> bool:
        """Whether the child is still running."""
        if self.process.poll() is None:
            return True
        if self.ended is None:
            self.ended = time.time()
        return False

    @property
    def returncode(self) -> int | None:
        """The child's exit status (None while it runs; negative: ended by that signal)."""
        return self.process.poll()

    @property
    def state(self) -> str:
        """'running', 'stopping', 'stopped', 'finished' or 'failed'."""
        if self.running:
            return "stopping" if self.stop_requested else "running"
        if self.stop_requested:
            return "stopped"
        return "finished" if self.returncode == 0 else "failed"

    def text(self) -> str:
        """The end of the log, as text."""
        if not self.log.is_file():
            return ""
        with self.log.open("rb") as handle:
            handle.seek(max(0, self.log.stat().st_size - TAIL_BYTES))
            return handle.read().decode("utf-8", errors="replace")

    def stop(self) -> None:
        """Ask the child to stop (SIGINT to its group), then kill it after the grace period."""
        if not self.running or self.stop_requested:
            return
        self.stop_requested = True
        _signal_group(self.process, signal.SIGINT)
        threading.Thread(target=self._kill_if_stuck, daemon=True).start()

    def wait(self, timeout: float | None = None) -> int | None:
        """Wait for the child to end; its exit status (None if it is still running)."""
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def _kill_if_stuck(self) -> None:
        """Kill a child that ignored SIGINT for the grace period."""
        if self.wait(STOP_GRACE_SECONDS) is None:
            _signal_group(self.process, signal.SIGKILL)

    def describe(self) -> str:
        """The command as a shell line (what to type to do the same by hand)."""
        shown = ["peftkit", *self.command[3:]] if self.command[1:3] == ["-m", "peftkit.cli"] else (
            self.command
        )  # fmt: skip
        return shlex.join(shown)


def _signal_group(process: subprocess.Popen, number: int) -> None:
    """Send a signal to the child's process group (it and whatever it started)."""
    try:
        os.killpg(process.pid, number)
    except ProcessLookupError:
        pass  # it has just ended


def start(command: list[str], log: Path, cwd: Path | None = None) -> Job:
    """Start a child process writing stdout and stderr to `log`, in its own process group (a
    Ctrl-C at the UI's terminal ends the UI, and Stop signals the child only)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    environment = {**os.environ, "PYTHONUNBUFFERED": "1"}  # progress reaches the log at once
    with log.open("wb") as handle:
        process = subprocess.Popen(
            command, stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            cwd=cwd, env=environment, start_new_session=True,
        )  # fmt: skip
    return Job(command, log, process)


class JobSlots:
    """At most one job per page (Train, Compare, Runs): a machine trains one thing at a time
    well, and a page shows one job's progress. Shared by every browser tab of the UI."""

    def __init__(self) -> None:
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()

    def get(self, slot: str) -> Job | None:
        """The slot's job (running or ended), if any."""
        return self._jobs.get(slot)

    def start(self, slot: str, command: list[str], log: Path, cwd: Path | None = None) -> Job:
        """Start a job in the slot; refused while the slot's previous job still runs."""
        with self._lock:
            current = self._jobs.get(slot)
            if current is not None and current.running:
                raise WorkspaceError(
                    f"A {slot} job is still running ({current.describe()}); stop it or wait for "
                    "it to end."
                )
            job = start(command, log, cwd)
            self._jobs[slot] = job
            return job

    def stop_all(self) -> None:
        """Stop every running job (the UI is shutting down)."""
        for job in list(self._jobs.values()):
            job.stop()
