"""Where a benchmark's result text goes: ``benchmarks/results/NAME_DATE.EXT`` unless ``--out``."""

from __future__ import annotations

import datetime
import os

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def save_result(text: str, out: str | None, name: str, ext: str = "md") -> str | None:
    """Prints ``text`` and writes it to ``out``, or to ``RESULTS/{name}_{today}.{ext}``.

    Args:
      text: the result (table and notes).
      out: a path, ``"-"`` (print only) or empty/None (the default path).
      name: file stem, e.g. ``f"pipeline_{jax.default_backend()}"``.
      ext: file extension.

    Returns:
      The path written, or None for ``"-"``.
    """
    print(text)
    if out == "-":
        return None
    path = out or os.path.join(RESULTS, f"{name}_{datetime.date.today().isoformat()}.{ext}")
    with open(path, "w") as f:
        f.write(text)
    print(f"wrote {path}")
    return path
