"""``srp_jax._pytree``: frozen dataclasses as pytrees, leaves vs static fields, key paths."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from srp_jax._pytree import pytree_dataclass, static_field


@pytree_dataclass
class Pair:
    a: jax.Array
    b: jax.Array
    scale: float = static_field(default=2.0)


def test_leaves_and_static_fields():
    p = Pair(jnp.arange(3.0), jnp.ones(2), scale=3.0)
    leaves, treedef = jax.tree_util.tree_flatten(p)
    assert len(leaves) == 2  # scale is structure, not a leaf
    np.testing.assert_array_equal(leaves[0], [0.0, 1.0, 2.0])
    back = jax.tree_util.tree_unflatten(treedef, [x * 10 for x in leaves])
    assert back.scale == 3.0 and float(back.b[0]) == 10.0
    # a different static value is a different tree structure (a different compile)
    assert treedef != jax.tree_util.tree_structure(Pair(p.a, p.b, scale=4.0))


def test_key_paths_name_attributes():
    paths = [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(Pair(1.0, 2.0))[0]]
    assert paths == [".a", ".b"]


def test_jit_traces_leaves_and_keys_the_cache_on_static_fields():
    traces = []

    @jax.jit
    def f(p):
        traces.append(p.scale)
        assert isinstance(p.a, jax.core.Tracer)
        return p.a * p.scale + p.b.sum()

    np.testing.assert_allclose(f(Pair(jnp.arange(2.0), jnp.ones(3))), [3.0, 5.0])
    f(Pair(jnp.arange(2.0) + 1, jnp.ones(3)))  # same structure: no retrace
    np.testing.assert_allclose(f(Pair(jnp.arange(2.0), jnp.ones(3), scale=5.0)), [3.0, 8.0])
    assert traces == [2.0, 5.0]


def test_vmap_maps_leaves():
    out = jax.vmap(lambda p: p.a * p.scale)(Pair(jnp.ones((4, 2)), jnp.zeros((4,))))
    assert out.shape == (4, 2) and float(out[0, 0]) == 2.0


def test_frozen_and_replace():
    p = Pair(jnp.ones(2), jnp.zeros(2))
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.a = jnp.zeros(2)
    q = p.replace(scale=7.0)
    assert q.scale == 7.0 and p.scale == 2.0 and q.a is p.a
    with pytest.raises(TypeError):
        p.replace(missing=1)
