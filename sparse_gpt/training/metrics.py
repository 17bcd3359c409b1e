"""Metrics of a run: ``WORKDIR/metrics.jsonl`` (one JSON object per logged step) and
TensorBoard event files under ``WORKDIR/tensorboard``.

On resume the rows past the restored step (written by the crashed run after its last
checkpoint) are dropped, so the file reads as one uninterrupted run; the file is rewritten
through a temporary file and a rename, so a crash during the rewrite loses nothing. A last
line a killed run left half-written is dropped with a warning naming the file.

In a multi-process run only process 0 writes (``primary``); the others only track the last
row, so no two processes append to or replace the same files.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any


class MetricsWriter:
    """Appends metric rows to metrics.jsonl and mirrors scalars to TensorBoard.

    ``primary=False`` (every process but 0 of a multi-process run) writes nothing: ``last``
    still starts from the file's row of ``resume_step`` and follows :meth:`write`.
    """

    def __init__(self, workdir: str, resume_step: int = 0, tensorboard: bool = True,
                 primary: bool = True):
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.last: dict[str, Any] = {}
        self._file = self._tb = None
        try:
            rows = _read(self.path) if resume_step else []
        except ValueError:
            if primary:
                raise
            rows = []   # caught mid-rewrite on a non-POSIX file system: process 0 reports it
        kept = [r for r in rows if r.get("step", 0) <= resume_step]
        if kept:
            self.last = kept[-1]
        if not primary:
            return
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        self._file = open(self.path, "a")
        if tensorboard:
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, row: dict[str, Any]) -> None:
        """Writes one row; numbers also go to TensorBoard under their key."""
        self.last = row
        if self._file is None:
            return
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tb.add_scalar(key, value, row["step"])

    def close(self) -> None:
        if self._file is None:
            return
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def _read(path: str) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl; a torn last line is dropped with a warning.

    Raises:
      ValueError: a line other than the last is not JSON (the file names it).
    """
    if not os.path.exists(path):
        return []
    with open(path) as f:
        lines = [(i + 1, line) for i, line in enumerate(f) if line.strip()]
    rows = []
    for n, (lineno, line) in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except ValueError:
            if n == len(lines) - 1:   # a write the killed run did not finish
                print(f"warning: {path}: dropped its torn last line {lineno} "
                      f"({line.strip()[:60]!r}).", file=sys.stderr, flush=True)
                break
            raise ValueError(f"{path} line {lineno} is not JSON ({line.strip()[:60]!r}); "
                             "fix or delete that line to resume.") from None
    return rows


def load_metrics(workdir: str) -> list[dict[str, Any]]:
    """Reads ``metrics.jsonl`` of a run, one dict per logged step."""
    return _read(os.path.join(workdir, "metrics.jsonl"))
