"""Metrics of a run: ``WORKDIR/metrics.jsonl`` (one JSON object per logged step) and
TensorBoard event files under ``WORKDIR/tensorboard``.

On resume the rows past the restored step (written by the crashed run after its last
checkpoint) are dropped, so the file reads as one uninterrupted run.
"""

from __future__ import annotations

import json
import os
from typing import Any


class MetricsWriter:
    """Appends metric rows to metrics.jsonl and mirrors scalars to TensorBoard."""

    def __init__(self, workdir: str, resume_step: int = 0, tensorboard: bool = True):
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.last: dict[str, Any] = {}
        rows = _read(self.path) if resume_step else []
        kept = [r for r in rows if r.get("step", 0) <= resume_step]
        with open(self.path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)
        if kept:
            self.last = kept[-1]
        self._file = open(self.path, "a")
        self._tb = None
        if tensorboard:
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, row: dict[str, Any]) -> None:
        """Writes one row; numbers also go to TensorBoard under their key."""
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        self.last = row
        if self._tb is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tb.add_scalar(key, value, row["step"])

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def _read(path: str) -> list[dict[str, Any]]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def load_metrics(workdir: str) -> list[dict[str, Any]]:
    """Reads ``metrics.jsonl`` of a run, one dict per logged step."""
    return _read(os.path.join(workdir, "metrics.jsonl"))
