"""The srp-jax error family.

Every error srp-jax raises on bad input is an :class:`SrpError`. Each concrete class also
subclasses the built-in exception the PyTorch reference raises in the same place, so code
written for the reference (``except KeyError``) and code written for srp-jax
(``except SrpError``) both work. The CLI turns any ``SrpError`` into one line on stderr and
exit status 2.
"""

from __future__ import annotations


class SrpError(Exception):
    """Base class of every error srp-jax raises on purpose. ``exit_code`` is the CLI's exit
    status for it (2: bad input or a refused run directory; 3: training diverged)."""

    exit_code = 2

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


class OutputError(SrpError, OSError):
    """A destination cannot be written: read-only, under a file, or something else is in the way."""


class RunDirectoryError(SrpError, RuntimeError):
    """A run directory refuses this run: locked by another trainer, holding files srp-jax did not
    write, or recording another config or data set (the message lists what differs)."""


class ResourceError(SrpError, MemoryError):
    """The run does not fit: the device or host ran out of memory (the message names the sizes)."""


class DivergenceError(SrpError, FloatingPointError):
    """Training produced a non-finite loss term, gradient or parameter (exit status 3). The run
    stops at that step; the last finite saved state stays on disk and no ``DONE`` is written."""

    exit_code = 3

    def __init__(self, message: str, *, step: int | None = None, terms: tuple[str, ...] = ()):
        super().__init__(message)
        self.step, self.terms = step, tuple(terms)


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
    "OutputError",
    "RunDirectoryError",
    "ResourceError",
    "DivergenceError",
]
