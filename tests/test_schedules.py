"""Schedules against their closed forms, evaluated on traced steps."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparse_gpt.sparsity import schedules as S


def _eval(fn, steps):
    """Evaluates ``fn`` on a traced step (one compile) for every step."""
    return np.asarray(jax.jit(jax.vmap(fn))(jnp.asarray(steps, jnp.int32)))


def test_constant():
    np.testing.assert_array_equal(_eval(S.constant(0.3), [0, 5, 10**6]), np.float32(0.3))


def test_gmp_cubic_closed_form():
    steps = [0, 100, 150, 200, 350, 700, 1100, 1200]
    got = _eval(S.gmp_density(0.1, start=100, end=1100), steps)
    for step, g in zip(steps, got):
        frac = min(max((step - 100) / 1000, 0.0), 1.0)
        sparsity = 0.9 * (1 - (1 - frac) ** 3)
        assert g == pytest.approx(1 - sparsity, abs=1e-6)
    assert got[0] == 1.0 and got[-1] == pytest.approx(0.1)
    assert np.all(np.diff(got) <= 0)
    # init_density and power are honoured.
    g = _eval(S.gmp_density(0.2, 0, 10, init_density=0.8, power=1.0), [5])[0]
    assert g == pytest.approx(0.5, abs=1e-6)
    with pytest.raises(ValueError, match="update_end"):
        S.gmp_density(0.1, 10, 10)


def test_rigl_cosine_drop_fraction():
    steps = [0, 250, 500, 750, 1000, 5000]
    got = _eval(S.cosine_decay(0.3, end=1000), steps)
    for step, g in zip(steps, got):
        t = min(step / 1000, 1.0)
        assert g == pytest.approx(0.15 * (1 + math.cos(math.pi * t)), abs=1e-6)
    assert got[-1] == pytest.approx(0.0, abs=1e-7)
    shifted = _eval(S.cosine_decay(0.3, end=300, start=100), [50, 100, 200, 300])
    np.testing.assert_allclose(shifted, [0.3, 0.3, 0.15, 0.0], atol=1e-6)


def test_periodic_update_steps():
    fn = S.periodic(every=100, start=50, end=400)
    got = _eval(fn, np.arange(0, 500))
    assert list(np.nonzero(got)[0]) == [50, 150, 250, 350]
    assert list(np.nonzero(_eval(S.periodic(3), np.arange(10)))[0]) == [0, 3, 6, 9]
    with pytest.raises(ValueError, match="update_every"):
        S.periodic(0)


def test_piecewise_phases_mst_like():
    # Warm-up (GMP from dense to 0.1), ultra-sparse (constant 0.1), restoration (linear back
    # up to 0.3), each phase a schedule of the step since it began.
    warm = S.gmp_density(0.1, 0, 100)
    restore = lambda t: 0.1 + 0.2 * jnp.minimum(t / 100.0, 1.0)  # noqa: E731
    fn = S.piecewise([100, 300], [warm, S.constant(0.1), restore], relative=True)
    got = _eval(fn, [0, 50, 99, 100, 299, 300, 350, 400, 1000])
    np.testing.assert_allclose(got[:3], _eval(warm, [0, 50, 99]), atol=1e-6)
    np.testing.assert_allclose(got[3:], [0.1, 0.1, 0.1, 0.2, 0.3, 0.3], atol=1e-6)
    # Absolute (global-step) phases.
    absolute = S.piecewise([10], [S.constant(1.0), lambda s: s / 100.0])
    np.testing.assert_allclose(_eval(absolute, [9, 10, 20]), [1.0, 0.1, 0.2], atol=1e-6)
    with pytest.raises(ValueError, match="len"):
        S.piecewise([10, 20], [S.constant(1.0)])


def test_staircase_sat_ladder():
    fn = S.staircase([600, 800, 900], [0.5, 0.3, 0.1, 0.0])
    np.testing.assert_allclose(_eval(fn, [0, 599, 600, 799, 800, 899, 900, 10**5]),
                               [0.5, 0.5, 0.3, 0.3, 0.1, 0.1, 0.0, 0.0], atol=1e-7)
