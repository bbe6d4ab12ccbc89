"""Frozen dataclasses that are JAX pytrees, without importing Flax.

``flax.struct.dataclass`` would do the same, but ``import flax.struct`` pulls in all of Flax
(about 6 MB of resident memory and import time) for what is two calls into JAX. The training,
decomposition and gating paths use this module instead; Flax stays for ``srp_jax.modules``.

``@pytree_dataclass`` makes a ``dataclasses.dataclass(frozen=True)`` whose fields are pytree
leaves (traced under ``jit``, mapped by ``vmap``) except those declared with
:func:`static_field`, which are part of the tree's structure (hashed into the compile cache).
Instances get ``.replace(**changes)``. Flattening with key paths names each leaf by
attribute, so checkpoints see the same paths as a ``flax.struct`` dataclass would give.
Unlike ``flax.struct``, no ``flax.serialization`` handler is registered
(``flax.serialization.to_state_dict`` returns the instance itself); srp-jax checkpoints go
through Orbax and the key paths above.
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

import jax

_STATIC = "srp_jax_static"

T = TypeVar("T")


def static_field(**kwargs: Any) -> Any:
    """A dataclass field that is static metadata, not a pytree leaf (e.g. ``k``, a softcap)."""
    metadata = {**kwargs.pop("metadata", {}), _STATIC: True}
    return dataclasses.field(metadata=metadata, **kwargs)


def _replace(self: T, **changes: Any) -> T:
    """A copy with the named fields changed (the instance is frozen)."""
    return dataclasses.replace(self, **changes)


def pytree_dataclass(cls: type[T]) -> type[T]:
    """Decorate ``cls`` as a frozen dataclass registered as a pytree (see the module doc)."""
    cls = dataclasses.dataclass(frozen=True)(cls)
    fields = dataclasses.fields(cls)
    data = [f.name for f in fields if not f.metadata.get(_STATIC, False)]
    meta = [f.name for f in fields if f.metadata.get(_STATIC, False)]
    jax.tree_util.register_dataclass(cls, data_fields=data, meta_fields=meta)
    if "replace" not in cls.__dict__:
        cls.replace = _replace
    return cls
