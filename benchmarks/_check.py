"""What a kernel check reports (benchmarks/pallas_check.py): one ``Check`` per comparison
of a kernel's result with its oracle, the tolerances, and the markdown report."""

from __future__ import annotations

import datetime
import math
import traceback
from typing import NamedTuple

import jax
import jax.numpy as jnp

_F32 = jnp.float32


class Check(NamedTuple):
    """The outcome of one comparison; ``error`` holds the exception of a check that raised."""

    name: str
    shape: str
    dtype: str
    max_abs: float
    max_rel: float
    tol: float
    error: str = ""

    @property
    def passed(self) -> bool:
        # NaN compares False, so a NaN anywhere fails.
        return not self.error and math.isfinite(self.max_rel) and self.max_rel <= self.tol

    def fields(self) -> list[str]:
        """name, shape, dtype, max abs, max rel, tol, PASS/FAIL (and the error, if any)."""
        verdict = "PASS" if self.passed else "FAIL" + (f" ({self.error})" if self.error else "")
        return [self.name, self.shape, self.dtype, f"{self.max_abs:.3e}", f"{self.max_rel:.3e}",
                f"{self.tol:.0e}", verdict]

    def line(self) -> str:
        """The check as one printed line."""
        f = self.fields()
        return f"{f[0]:<40} {f[1]:<24} {f[2]:<8} abs {f[3]}  rel {f[4]}  tol {f[5]}  {f[6]}"


def tolerance(dtype, platform: str | None = None) -> float:
    """Tolerance on ``max |got - ref| / max |ref|`` for outputs of ``dtype`` on ``platform``."""
    if jnp.dtype(dtype) == jnp.bfloat16:
        return 2e-2
    platform = platform or jax.default_backend()
    return 5e-3 if platform == "gpu" else 1e-4  # TF32 inputs in Triton's fp32 dots


@jax.jit
def _errors(got, want):
    """(max |got - want|, max |want|) as fp32 scalars, computed where the arrays live."""
    want = want.astype(_F32)
    return jnp.max(jnp.abs(got.astype(_F32) - want)), jnp.max(jnp.abs(want))


def compare(name: str, shape: str, got, want, tol: float) -> Check:
    """Compares ``got`` (dtype as computed) with the oracle ``want``.

    Args:
      name: check name, e.g. ``"bsmm/big/d0.25/dW"``.
      shape: the problem's shape, for the report.
      got: the backend's result.
      want: the oracle's result (any float dtype; compared in fp32).
      tol: tolerance on the error relative to ``max |want|`` (0 for "must be exactly zero";
        then ``want`` should be all zeros and the relative error is the absolute one).

    Returns:
      A ``Check``; it fails when shapes differ or the relative error is above ``tol`` or NaN.
    """
    dtype = jnp.dtype(got.dtype).name
    if got.shape != want.shape:
        return Check(name, shape, dtype, math.nan, math.nan, tol,
                     f"shape {got.shape} != reference {want.shape}")
    err, scale = (float(v) for v in _errors(got, want))
    rel = err / scale if scale > 0 else err
    return Check(name, shape, dtype, err, rel, tol)


def guarded(fn, name: str, shape: str, dtype) -> list[Check]:
    """Runs one check function; an exception becomes a failed check (traceback to stderr)."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - a kernel that fails to compile is a FAIL line
        traceback.print_exc()
        first = (str(e).strip().splitlines() or [""])[0][:160]
        msg = f"{type(e).__name__}: {first}"
        return [Check(name, shape, jnp.dtype(dtype).name, math.nan, math.nan,
                      tolerance(dtype), msg)]


def markdown(checks: list[Check], title: str) -> str:
    """The checks as a markdown report: device, jax version, date, a table, a verdict."""
    dev = jax.devices()[0]
    n_fail = sum(not c.passed for c in checks)
    rows = ["| " + " | ".join(f.replace("|", "/") for f in c.fields()) + " |" for c in checks]
    return "\n".join([
        f"# {title}", "",
        f"device {dev.platform}:{dev.device_kind} (x{jax.device_count()}); jax {jax.__version__}; "
        f"date {datetime.datetime.now().isoformat(timespec='seconds')}", "",
        "Relative error = max |got - ref| / max |ref| (the output scale); dW-off-mask must be "
        "exactly 0. Reference: dense masked product / dense masked attention in fp32, "
        "`highest` precision.", "",
        "| check | shape | dtype | max abs err | max rel err | tol | result |",
        "|---|---|---|---|---|---|---|", *rows, "",
        f"{len(checks) - n_fail} of {len(checks)} checks passed.", ""])
