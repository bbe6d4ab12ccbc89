"""The srp-jax error family.

Every error srp-jax raises on bad input is an :class:`SrpError`. Each concrete class also
subclasses the built-in exception the PyTorch reference raises in the same place, so code
written for the reference (``except KeyError``) and code written for srp-jax
(``except SrpError``) both work. The CLI turns any ``SrpError`` into one line on stderr and
exit status 2.
"""

from __future__ import annotations


class SrpError(Exception):
    """Base class of every error srp-jax raises on purpose."""

    def __str__(self) -> str:  # KeyError quotes its message; keep one clean line instead.
        return " ".join(str(a) for a in self.args) if self.args else self.__class__.__name__


class ConfigError(SrpError, ValueError):
    """A configuration value or key is wrong (unknown key, bad type, bad value)."""


class MissingConfigError(SrpError, KeyError):
    """A checkpoint carries no factorizer config and none was given."""


class ShapeError(SrpError, ValueError):
    """An array has the wrong rank, shape or dtype, or disagrees with the dictionary."""


class NonFiniteError(SrpError, ValueError):
    """An input array holds NaN or Inf."""


class CheckpointError(SrpError, ValueError):
    """A checkpoint file or directory is missing, damaged, or does not match its schema."""


class MissingKeyError(CheckpointError, KeyError, RuntimeError):
    """A checkpoint or state dict lacks a required key (named in the message).

    ``KeyError`` for a missing payload/checkpoint key, ``RuntimeError`` because torch's strict
    ``load_state_dict`` raises that for a missing state-dict key.
    """


class UnexpectedKeyError(CheckpointError, RuntimeError):
    """A state dict holds keys the architecture does not have (named in the message).

    A ``RuntimeError`` like torch's strict ``load_state_dict``.
    """


class StateDictShapeError(ShapeError, CheckpointError, RuntimeError):
    """A state-dict tensor's shape disagrees with the config (torch raises ``RuntimeError``)."""


class ThresholdNotReadyError(SrpError, RuntimeError):
    """BatchTopK was asked for an eval-mode code before any threshold was learned."""


class DependencyError(SrpError, ImportError):
    """An optional dependency is missing (the message names the pip extra to install)."""


class HubError(SrpError, OSError):
    """A Hub dictionary could not be found locally or downloaded."""


__all__ = [
    "SrpError",
    "ConfigError",
    "MissingConfigError",
    "ShapeError",
    "NonFiniteError",
    "CheckpointError",
    "MissingKeyError",
    "UnexpectedKeyError",
    "StateDictShapeError",
    "ThresholdNotReadyError",
    "DependencyError",
    "HubError",
]
