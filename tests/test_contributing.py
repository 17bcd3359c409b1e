"""The CONTRIBUTING.md walkthroughs, done for real: a method defined and registered here, a
config family written to a file and loaded like ``--config PATH:ARG``."""

import dataclasses
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sparse_gpt import cli
from sparse_gpt import config as config_lib
from sparse_gpt import plan as plan_lib
from sparse_gpt.sparsity import masks as M
from sparse_gpt.sparsity import methods


@dataclasses.dataclass(frozen=True)
class IndexGrow(methods.SET):
    """SET that regrows the dead weights of lowest (or highest) flat index: a deterministic
    grow score, so the update has a hand-computable result."""

    index_order: str = "ascending"     # read from config.sparsity.index_order when present

    def validate(self, shapes, num_steps):
        super().validate(shapes, num_steps)
        if self.index_order not in ("ascending", "descending"):
            raise ValueError(f"sparsity.index_order={self.index_order!r}: ascending|descending")

    def grow_scores(self, params, grads, sub, rng):
        def score(m):
            idx = jnp.arange(m.size, dtype=jnp.float32).reshape(m.shape)
            return -idx if self.index_order == "ascending" else idx
        return jax.tree.map(score, sub)


methods.register_method("index_grow", IndexGrow)


def _config(**sparsity):
    c = config_lib.get_config("tiny")
    c.unlock()
    c.model.update(n_layers=2, d_model=16, n_heads=2)
    c.data.seq_len = 32
    c.train.num_steps = 40
    c.sparsity.update(method="index_grow", density=0.5, sparse_layers="mlp/fc",
                      update_every=5, drop_fraction=0.25, **sparsity)
    return c


def _oracle(w, live, frac, ascending):
    """Per matrix: keep the best live |w|, drop round(frac * live), grow as many dead ones
    (after the drop) by index."""
    out = np.zeros_like(live)
    for i in range(w.shape[0]):
        wi, li = np.abs(w[i]).reshape(-1), live[i].reshape(-1)
        n = int(li.sum())
        n_drop = int(np.round(frac * n))
        order = sorted(np.flatnonzero(li), key=lambda j: (-wi[j], j))
        keep = np.zeros(li.size, bool)
        keep[order[:n - n_drop]] = True
        dead = np.flatnonzero(~keep)
        grow = dead[:n_drop] if ascending else dead[::-1][:n_drop]
        keep[grow] = True
        out[i] = keep.reshape(live[i].shape)
    return out


@pytest.mark.parametrize("order", ["ascending", "descending"])
def test_a_registered_method_runs_from_the_config(order):
    c = _config()
    if order == "descending":
        c.sparsity.index_order = order          # a notebook adds the method's own key
    method = plan_lib.from_config(c).method
    assert type(method) is IndexGrow and method.index_order == order
    rng = np.random.default_rng(0)
    w = rng.standard_normal((2, 16, 64)).astype(np.float32)
    live = rng.random((2, 16, 64)) < 0.5
    params = {"blocks": {"mlp": {"fc": {"kernel": jnp.asarray(np.where(live, w, 0))}}}}
    masks = {"blocks": {"mlp": {"fc": {"kernel": jnp.asarray(live)}}}}
    opt = optax.adam(1e-3).init(params)
    new_p, new_m, _, _ = jax.jit(method.update)(0, params, masks, params, opt,
                                                jax.random.key(0))
    want = _oracle(np.where(live, w, 0), live, 0.25, order == "ascending")
    got = np.asarray(new_m["blocks"]["mlp"]["fc"]["kernel"])
    np.testing.assert_array_equal(got, want)
    grown = got & ~live
    assert grown.any() and not np.asarray(new_p["blocks"]["mlp"]["fc"]["kernel"])[grown].any()


def test_registration_and_its_errors():
    assert methods.METHODS["index_grow"] is IndexGrow
    with pytest.raises(ValueError, match="already registered"):
        methods.register_method("set", IndexGrow)

    class NotAMethod:
        pass

    with pytest.raises(TypeError, match="subclass of SparsityMethod"):
        methods.register_method("bad", NotAMethod)
    with pytest.raises(ValueError, match="index_order"):
        c = _config()
        c.sparsity.index_order = "sideways"
        plan_lib.from_config(c)
    with pytest.raises(ValueError, match="not read by method=index_grow"):
        plan_lib.from_config(_config(prune_scope="global"))


FAMILY = '''
"""A config family: RigL at a density given as ARG (e.g. my_family.py:0.1)."""
from sparse_gpt import config as config_lib


def get_config(arg=None):
    c = config_lib.get_config("tiny")
    c.sparsity.update(method="rigl", density=float(arg or 0.25), distribution="erk")
    c.preset = f"my_family-{arg}"
    return c
'''


def test_a_config_family_loads_like_the_command_line(tmp_path):
    path = tmp_path / "my_family.py"
    path.write_text(textwrap.dedent(FAMILY))
    config = cli.load_config(f"{path}:0.1")
    cli.apply_override(config, "train.num_steps", "80")
    p = plan_lib.from_config(config)
    assert type(p.method) is methods.RigL
    assert (p.method.settings.density, p.method.settings.distribution) == (0.1, "erk")
    assert p.method.settings.update_end == 60                   # 75% of the overridden steps
    assert config.preset == "my_family-0.1"
