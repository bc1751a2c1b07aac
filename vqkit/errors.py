"""The errors vqkit raises on purpose, all under ``VqkitError``.

Each names what was wrong and, for a file, which file. The command line prints a
``VqkitError`` as one line and exits with status 2; any other exception is a bug in vqkit (or
in what it calls) and keeps its traceback. The subclasses that stand for bad values are also
``ValueError`` (and ``TrainingError`` a ``RuntimeError``), so code written against the built-in
types keeps working.
"""

from __future__ import annotations


class VqkitError(Exception):
    """Base of every error vqkit raises on purpose: bad files, bad configs, bad arguments."""


class ConfigError(VqkitError, ValueError):
    """A configuration that cannot describe a model or a run (a bad field, an unknown key)."""


class UsageError(VqkitError, ValueError):
    """An argument that cannot be used: a wrong shape, a value out of range, an option that
    does not apply to this model."""


class CodecError(VqkitError, ValueError):
    """A ``.vq`` file that cannot be decoded, or an image that cannot be coded; the message
    names the file and the problem."""
