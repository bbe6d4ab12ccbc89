"""Package data: the frozen built-in text corpus (see :mod:`srp_jax.corpus`)."""
