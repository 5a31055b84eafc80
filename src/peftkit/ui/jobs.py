"""The CLI's commands as child processes of the UI: training, comparisons, evaluation, merging and
export run as `python -m peftkit.cli ...`, so the page stays responsive, a crash in one cannot take
the UI down, and each run is exactly what the same command typed in a terminal would do.

Stop sends SIGINT to the child's process group, as Ctrl-C at a terminal would: Trainer stops where
it is, and the checkpoints already in the run folder stay (each one is renamed into place only
once complete, training/checkpoints.py), so `peftkit train --resume` continues from the newest.
A child that has not ended `STOP_GRACE_SECONDS` later gets SIGTERM, and `KILL_GRACE_SECONDS`
after that SIGKILL; neither loses more than the step in progress. A child is started with SIGINT
at its default even when the UI runs with it ignored (a background job of a script), so the first
signal normally suffices.

The jobs live on the server, one per slot, shared by every page and browser tab, and each is
recorded in the workspace (`.ui/jobs/<slot>.json`: process id, its start time, command, log): a UI
started again on the workspace finds a child an earlier UI left running, shows it, can stop it,
and refuses to start a second one in its slot."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peftkit.ui.workspace import WorkspaceError

STOP_GRACE_SECONDS = 10.0  # after SIGINT, before SIGTERM
KILL_GRACE_SECONDS = 5.0  # after SIGTERM, before SIGKILL
TAIL_BYTES = 64 * 1024  # of a log, what the page reads back
JOBS = "jobs"  # the folder (in the workspace's .ui) recording each slot's job


def cli_command(*arguments: str) -> list[str]:
    """A peftkit command line run by this interpreter (the UI's own environment)."""
    return [sys.executable, "-m", "peftkit.cli", *arguments]


def process_start_time(pid: int) -> int | None:
    """When a process started (clock ticks since boot, /proc/<pid>/stat), None if it is gone or
    a zombie: with its id, what tells a process apart from a later one given the same id."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()  # after "pid (name) "
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


class Adopted:
    """A child an earlier UI started and left running: polled through /proc, signalled by its
    process group, its exit status unknown (another process collects it)."""

    returncode = None

    def __init__(self, pid: int, start_time: int) -> None:
        self.pid = pid
        self.start_time = start_time

    def poll(self) -> int | None:
        """None while it runs; -1 once it has ended (its exit status is not ours to read)."""
        return None if process_start_time(self.pid) == self.start_time else -1

    def wait(self, timeout: float | None = None) -> int:
        """Wait for it to end, as Popen.wait does."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(str(self.pid), timeout or 0)
            time.sleep(0.1)
        return -1


@dataclass
class Job:
    """One child process, its command and its log file."""

    command: list[str]
    log: Path
    process: subprocess.Popen | Adopted
    started: float = field(default_factory=time.time)
    ended: float | None = None
    stop_requested: bool = False

    @property
    def adopted(self) -> bool:
        """Whether an earlier UI started it (its exit status is unknown)."""
        return isinstance(self.process, Adopted)

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
        """The child's exit status (None while it runs, or unknown for an adopted one;
        negative: ended by that signal)."""
        return None if self.adopted else self.process.poll()

    @property
    def state(self) -> str:
        """'running', 'stopping', 'stopped', 'finished', 'failed' or 'ended' (an adopted child,
        whose exit status no one told us)."""
        if self.running:
            return "stopping" if self.stop_requested else "running"
        if self.stop_requested:
            return "stopped"
        if self.adopted:
            return "ended"
        return "finished" if self.returncode == 0 else "failed"

    @property
    def key(self) -> tuple[float, str]:
        """What changes when the page should draw the job again: which job, and its state."""
        return (self.started, self.state)

    def text(self) -> str:
        """The end of the log, as text."""
        if not self.log.is_file():
            return ""
        with self.log.open("rb") as handle:
            handle.seek(max(0, self.log.stat().st_size - TAIL_BYTES))
            return handle.read().decode("utf-8", errors="replace")

    def stop(self) -> None:
        """Ask the child to stop (SIGINT to its group), escalating to SIGTERM and then SIGKILL
        while it goes on."""
        if not self.running or self.stop_requested:
            return
        self.stop_requested = True
        _signal_group(self.process.pid, signal.SIGINT)
        threading.Thread(target=self._escalate, daemon=True).start()

    def wait(self, timeout: float | None = None) -> int | None:
        """Wait for the child to end; its exit status (None if it is still running)."""
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def _escalate(self) -> None:
        """SIGTERM to a child that outlived SIGINT's grace period, SIGKILL if that is ignored."""
        if self.wait(STOP_GRACE_SECONDS) is None:
            _signal_group(self.process.pid, signal.SIGTERM)
            if self.wait(KILL_GRACE_SECONDS) is None:
                _signal_group(self.process.pid, signal.SIGKILL)

    def describe(self) -> str:
        """The command as a shell line (what to type to do the same by hand)."""
        shown = ["peftkit", *self.command[3:]] if self.command[1:3] == ["-m", "peftkit.cli"] else (
            self.command
        )  # fmt: skip
        return shlex.join(shown)

    def record(self) -> dict[str, Any]:
        """What a later UI needs to find this child again."""
        return {"pid": self.process.pid, "start_time": process_start_time(self.process.pid),
                "command": self.command, "log": str(self.log), "started": self.started}  # fmt: skip


def _signal_group(pid: int, number: int) -> None:
    """Send a signal to the child's process group (it and whatever it started)."""
    try:
        os.killpg(pid, number)
    except (ProcessLookupError, PermissionError):
        pass  # it has just ended


def _default_sigint() -> None:
    """In the child before it runs: SIGINT back to its default, so Python turns it into
    KeyboardInterrupt (an ignored SIGINT would be inherited, and Stop would wait for SIGTERM)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start(command: list[str], log: Path, cwd: Path | None = None, append: bool = False) -> Job:
    """Start a child process writing stdout and stderr to `log` (after what it holds, if
    `append`), in its own process group (a Ctrl-C at the UI's terminal ends the UI, and Stop
    signals the child only)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    environment = {**os.environ, "PYTHONUNBUFFERED": "1"}  # progress reaches the log at once
    # transformers' warnings (a "newly initialized" classifier head on every load of a
    # classification run, which the adapter then fills) are not the command's; its errors are.
    environment.setdefault("TRANSFORMERS_VERBOSITY", "error")
    ignored = signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    with log.open("ab" if append else "wb") as handle:
        process = subprocess.Popen(
            command, stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            cwd=cwd, env=environment, start_new_session=True,
            preexec_fn=_default_sigint if ignored else None,
        )  # fmt: skip
    return Job(command, log, process)


class JobSlots:
    """At most one job per page (Train, Compare, Runs): a machine trains one thing at a time
    well, and a page shows one job's progress. Shared by every browser tab of the UI, and
    recorded in `folder` (when given) so that a UI started later on the same workspace finds a
    job still running."""

    def __init__(self, folder: Path | None = None) -> None:
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()
        self.folder = folder
        if folder is not None:
            self._jobs.update(_recorded_jobs(folder))

    def get(self, slot: str) -> Job | None:
        """The slot's job (running or ended), if any."""
        return self._jobs.get(slot)

    def check_free(self, slot: str) -> None:
        """Refuse while the slot's job still runs (before anything is written for a new one)."""
        current = self._jobs.get(slot)
        if current is not None and current.running:
            earlier = " (started by an earlier peftkit ui)" if current.adopted else ""
            raise WorkspaceError(
                f"A {slot} job is still running{earlier}: `{current.describe()}`; stop it or "
                "wait for it to end."
            )

    def start(
        self, slot: str, command: list[str], log: Path, cwd: Path | None = None,
        append: bool = False,
    ) -> Job:  # fmt: skip
        """Start a job in the slot; refused while the slot's previous job still runs."""
        with self._lock:
            self.check_free(slot)
            job = start(command, log, cwd, append)
            self._jobs[slot] = job
            if self.folder is not None:
                self.folder.mkdir(parents=True, exist_ok=True)
                (self.folder / f"{slot}.json").write_text(json.dumps(job.record()) + "\n")
            return job

    def running(self) -> list[Job]:
        """The jobs still running."""
        return [job for job in list(self._jobs.values()) if job.running]

    def stop_all(self, wait: float = 0.0) -> None:
        """Stop every running job (the UI is shutting down), waiting up to `wait` seconds for
        each to end (the escalation to SIGTERM and SIGKILL happens within that wait)."""
        jobs = self.running()
        for job in jobs:
            job.stop()
        deadline = time.monotonic() + wait
        for job in jobs:
            job.wait(max(0.0, deadline - time.monotonic()))


def _recorded_jobs(folder: Path) -> dict[str, Job]:
    """The jobs an earlier UI recorded in `folder` whose processes still run."""
    found: dict[str, Job] = {}
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            data = json.loads(path.read_text())
            pid, start_time = int(data["pid"]), data["start_time"]
            command, log, started = list(data["command"]), Path(data["log"]), data["started"]
        except (OSError, ValueError, KeyError, TypeError):
            continue  # not one of ours, or half written: nothing to find
        if start_time is not None and process_start_time(pid) == start_time:
            found[path.stem] = Job(command, log, Adopted(pid, start_time), started=started)
    return found


@contextlib.contextmanager
def children_stopped_on_exit(slots: JobSlots, wait: float | None = None) -> Iterator[None]:
    """Run the block (the server) with SIGTERM raising KeyboardInterrupt as Ctrl-C does; at its
    end, however it ends, stop the running children and wait for them (no orphans)."""
    wait = STOP_GRACE_SECONDS + KILL_GRACE_SECONDS + 5.0 if wait is None else wait

    def interrupt(number: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {number}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        slots.stop_all(wait)
