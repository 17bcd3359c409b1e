"""Small training configs and batch helpers shared by the tests that train end to end."""

import numpy as np

from sparse_gpt import cli
from sparse_gpt import config as config_lib


def small_config(corpus, base=None, **overrides):
    """A 2-layer byte model on the `corpus` fixture's slice; ``overrides`` win.

    ``base``: the config to shrink (default: the ``tiny`` preset), e.g. a config family's.
    """
    path, data_dir = corpus
    c = config_lib.get_config("tiny") if base is None else base
    for key, value in dict({"model.n_layers": 2, "model.d_model": 32, "model.n_heads": 2,
                            "model.max_len": 32, "data.seq_len": 32, "data.path": path,
                            "data.data_dir": data_dir, "train.batch_size": 4,
                            "train.num_steps": 8, "train.warmup_steps": 2,
                            "train.log_every": 2, "train.eval_every": 4,
                            "train.eval_batches": 2, "train.checkpoint_every": 4,
                            "train.sample_tokens": 8, "train.progress_bar": False},
                           **overrides).items():
        cli.apply_override(c, key, str(value))
    return c


def take(it, n):
    """The next ``n`` batches of iterator ``it``."""
    return [next(it) for _ in range(n)]


def assert_same(a, b):
    """Two lists of batches are equal, key by key and value by value."""
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
