"""The side-by-side benchmark (see bench/README.md); a folder of the repository, not part of the srp_jax package."""
