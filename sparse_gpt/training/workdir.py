"""Guards of a run folder: one run at a time, a clean stop on SIGTERM / SIGINT, and the
record of the settings each start used.

``trainer.train`` holds both guards for the run's whole life::

    with WorkdirLock(workdir), StopOnSignal() as stop:
        for step in ...:
            ...
            if stop.should_stop(done):        # every process agrees on ``done``
                save a checkpoint of ``done``; raise Stopped(stop.signal_name, done, ...)

* :class:`WorkdirLock` is an exclusive ``flock`` on ``WORKDIR/run.lock`` (``run.lock.<i>``
  for process ``i`` > 0 of a multi-process run). The kernel drops it when the process ends,
  however it ends (SIGKILL included), so a lock left by a dead run is never "held": the next
  run takes it over and says whose it was. A second live run is refused at once, with the
  holder's host and PID.
* :class:`StopOnSignal`: the first SIGTERM or SIGINT asks the loop to finish the current
  step, write its checkpoint and raise :class:`Stopped` (``train.py`` prints one line and
  exits with :data:`STOPPED_EXIT_CODE`); a second one gets the signal's previous handling
  (SIGTERM: the process ends at once; SIGINT: ``train.py`` ends at once, a notebook gets
  ``KeyboardInterrupt``). In a multi-process run (``jax.distributed``), SIGTERM is left to
  JAX's preemption notifier and every process stops at the step
  ``multihost_utils.reached_preemption_sync_point`` agrees on; SIGINT is forwarded to it.
* ``config.json`` is the run's current config, ``config_history.jsonl`` one row per start:
  the step it started from and the settings it changed (see ``checkpoint.check_resume``).

Only the standard library is imported at module level (tests use the lock from small
processes that never load JAX).
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import signal
import socket
import sys
import threading
from typing import Any

# EX_TEMPFAIL of sysexits.h: stopped cleanly with a checkpoint of the current step; running
# the same command again resumes. Distinct from 0 (finished), 1 (error) and 128 + signal.
STOPPED_EXIT_CODE = 75


class WorkdirInUseError(RuntimeError):
    """Another live run holds the workdir's lock."""


class Stopped(Exception):
    """The run stopped on a signal after saving a checkpoint of the step it had finished."""

    def __init__(self, signal_name: str, step: int, checkpoint_dir: str):
        self.signal_name, self.step, self.checkpoint_dir = signal_name, step, checkpoint_dir
        super().__init__(f"stopped by {signal_name} after step {step}: checkpoint {step} is in "
                         f"{checkpoint_dir}; run the same command again to resume.")


def prepare(workdir: str) -> str:
    """Creates ``workdir`` if needed; returns its absolute path.

    Raises:
      ValueError: ``workdir`` exists and is not a folder.
    """
    path = os.path.abspath(os.path.expanduser(workdir))
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"--workdir {workdir} is a file, not a folder; pass the run's folder "
                         "(it is created if missing).")
    os.makedirs(path, exist_ok=True)
    return path


def _holder_text(holder: dict[str, Any]) -> str:
    if not holder:
        return "a run that is just starting (no holder recorded yet)"
    command = str(holder.get("command", "?"))
    command = command if len(command) <= 80 else command[:77] + "..."
    return (f"PID {holder.get('pid')} on host {holder.get('host')}, since "
            f"{holder.get('started')}: {command}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # alive, another user's
        return True
    return True


class WorkdirLock:
    """An exclusive lock on a run folder, held from :meth:`acquire` to :meth:`release`.

    Args:
      workdir: the run folder (must exist).
      process_index: this process's index in a multi-process run (each locks its own file,
        so every process of a second run is refused).
    """

    def __init__(self, workdir: str, process_index: int = 0):
        name = "run.lock" if process_index == 0 else f"run.lock.{process_index}"
        self.workdir = workdir
        self.path = os.path.join(workdir, name)
        self.previous: dict[str, Any] = {}   # a dead holder this lock was taken over from
        self._fd: int | None = None

    def acquire(self) -> "WorkdirLock":
        """Takes the lock, or raises at once if a live process holds it.

        Raises:
          WorkdirInUseError: another live run holds it (its host and PID are named).
        """
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read(fd)
                raise WorkdirInUseError(
                    f"{self.workdir} is in use by another run ({_holder_text(holder)}). Wait "
                    f"for it to end, stop it (kill -TERM {holder.get('pid', '<PID>')} on "
                    f"{holder.get('host', 'its host')} saves a checkpoint first), or pass "
                    "another --workdir.") from None
            except OSError:   # no flock on this filesystem: fall back to the PID on record
                holder = _read(fd)
                if holder and (holder.get("host") != socket.gethostname()
                               or _pid_alive(int(holder.get("pid", 0)))):
                    raise WorkdirInUseError(
                        f"{self.workdir} is in use by another run ({_holder_text(holder)}); "
                        f"this filesystem has no file locks, so if that run is gone delete "
                        f"{self.path}.") from None
            self.previous = _read(fd)
            if self.previous:   # flock is dropped on any exit, so its holder is gone
                print(f"warning: {self.path}: taking over the lock of a run that ended "
                      f"without releasing it ({_holder_text(self.previous)}).",
                      file=sys.stderr, flush=True)
            me = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": datetime.datetime.now().isoformat(timespec="seconds"),
                  "command": " ".join(sys.argv)[:300]}
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return self

    def release(self) -> None:
        """Clears the holder record and drops the lock (an empty file is a free lock)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)
        finally:
            os.close(fd)   # closing drops the flock

    def __enter__(self) -> "WorkdirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read(fd: int) -> dict[str, Any]:
    text = os.pread(fd, 4096, 0).decode(errors="replace").strip()
    if not text:
        return {}
    try:
        return json.loads(text)
    except ValueError:
        return {"pid": "?", "host": "?", "started": "?", "command": text[:100]}


def _multiprocess_preemption() -> bool:
    """Whether JAX's preemption sync runs here (jax.distributed with more than one process)."""
    if "jax" not in sys.modules:
        return False
    import jax
    try:
        from jax._src import distributed
    except ImportError:
        return False
    return (jax.process_count() > 1
            and getattr(distributed.global_state, "preemption_sync_manager", None) is not None)


class StopOnSignal:
    """Turns the first SIGTERM or SIGINT into a request to stop after the current step.

    Use as a context manager around the training loop and call :meth:`should_stop` after
    every step; the previous handlers come back on exit. Outside the main thread (where
    Python cannot install handlers) it never asks to stop.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}
        self._sync = False

    def __enter__(self) -> "StopOnSignal":
        if threading.current_thread() is not threading.main_thread():
            return self
        self._sync = _multiprocess_preemption()
        # With JAX's preemption sync, SIGTERM belongs to its notifier (a C handler that a
        # Python handler would replace); SIGINT is forwarded to it.
        for sig in (signal.SIGINT,) if self._sync else self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.signal_name is not None:   # the second signal: its previous handling, now
            previous = self._previous.pop(signum, signal.SIG_DFL)
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
            os.write(2, f"\n{name} again: exiting at once, without a checkpoint.\n".encode())
            signal.raise_signal(signum)
            return
        self.signal_name = name
        again = "Ctrl-C" if signum == signal.SIGINT else f"send {name}"
        # os.write, not print: a handler may run while the main thread is inside a print.
        os.write(2, f"\n{name}: stopping after the current step with a checkpoint of it "
                    f"({again} again to exit at once, without one).\n".encode())
        if self._sync:
            os.kill(os.getpid(), signal.SIGTERM)   # to JAX's preemption notifier

    def should_stop(self, step: int) -> bool:
        """Whether to stop after ``step``; call it after every step, on every process."""
        if self._sync:
            from jax.experimental import multihost_utils
            if multihost_utils.reached_preemption_sync_point(step):
                self.signal_name = self.signal_name or "SIGTERM"
                return True
            return False
        return self.signal_name is not None


def write_json_atomic(path: str, obj: Any) -> None:
    """Writes ``obj`` as JSON to ``path`` through a temporary file and a rename."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def record_start(workdir: str, config: dict, step: int, changes: dict) -> None:
    """Writes ``config.json`` (the run's current config) and appends a row to
    ``config_history.jsonl``: the step this start trains from (0: a fresh run, event
    ``start``; else ``resume``) and the settings it changed, ``{key: [old, new]}``."""
    write_json_atomic(os.path.join(workdir, "config.json"), config)
    row = {"step": step, "time": datetime.datetime.now().isoformat(timespec="seconds"),
           "host": socket.gethostname(), "pid": os.getpid(),
           "event": "start" if step == 0 else "resume",
           "changes": {k: list(v) for k, v in changes.items()}}
    with open(os.path.join(workdir, "config_history.jsonl"), "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())
