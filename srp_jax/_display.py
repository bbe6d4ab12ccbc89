"""Short text and HTML summaries of srp-jax objects (``repr`` and notebook ``_repr_html_``).

Everything here reads shapes, dtypes and a few scalars; nothing prints whole arrays.
"""

from __future__ import annotations

import html
import math
from collections.abc import Iterable
from typing import Any

import numpy as np


def shape_text(x: Any) -> str:
    """``float32[12, 4]`` for an array, ``None`` for None, the repr of anything else."""
    if x is None:
        return "None"
    shape = getattr(x, "shape", None)
    dtype = getattr(x, "dtype", None)
    if shape is None or dtype is None:
        return repr(x)
    return f"{np.dtype(dtype).name}[{', '.join(str(int(s)) for s in shape)}]"


def scalar_text(x: Any, digits: int = 4) -> str:
    """A 0-d array / number as text (``nan`` kept), an array as its shape."""
    if x is None:
        return "None"
    if getattr(x, "ndim", 0):
        return shape_text(x)
    try:
        value = float(np.asarray(x))
    except Exception:  # noqa: BLE001 - a tracer or anything else without a concrete value
        return shape_text(x) if hasattr(x, "shape") else repr(x)
    if math.isnan(value):
        return "nan"
    if value.is_integer() and abs(value) < 1e15 and np.asarray(x).dtype.kind in "iub":
        return str(int(value))
    return f"{value:.{digits}g}"


def count_parameters(tree: Any) -> int:
    import jax

    return int(sum(int(np.prod(getattr(leaf, "shape", ()))) for leaf in jax.tree.leaves(tree)))


def html_table(title: str, rows: Iterable[tuple[str, Any]], note: str | None = None) -> str:
    """A compact two-column HTML table (values escaped), for ``_repr_html_``."""
    cells = "".join(
        f"<tr><td style='text-align:left;padding-right:1em'><b>{html.escape(str(k))}</b></td>"
        f"<td style='text-align:left'><code>{html.escape(str(v))}</code></td></tr>"
        for k, v in rows
    )
    foot = f"<div style='color:#666'>{html.escape(note)}</div>" if note else ""
    return f"<div><div><b>{html.escape(title)}</b></div><table>{cells}</table>{foot}</div>"


def fields_repr(name: str, rows: Iterable[tuple[str, Any]]) -> str:
    """``Name(a=1, b=float32[3])``."""
    return f"{name}(" + ", ".join(f"{k}={v}" for k, v in rows) + ")"


__all__ = ["shape_text", "scalar_text", "count_parameters", "html_table", "fields_repr"]
