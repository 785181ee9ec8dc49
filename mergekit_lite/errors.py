"""The error hierarchy. The CLI turns each into one line and an exit code."""

from __future__ import annotations


class MergekitError(Exception):
    """Base class of every error mergekit-lite raises on purpose."""

    exit_code = 1


class InputError(MergekitError):
    """The user's input is invalid: manifest, checkpoint or adapter. Exit code 2."""

    exit_code = 2


class ManifestError(InputError):
    """The manifest is malformed or names something that is not there."""


class CheckpointError(InputError):
    """A safetensors file, index or config cannot be trusted."""


class AdapterError(InputError):
    """An adapter is unsupported or does not fit the base model."""


class PlanError(InputError):
    """The adapters cannot be mapped onto the base model."""


class OutputError(InputError):
    """The output location cannot be used (exists, is inside an input, no space)."""


class OutputBusy(OutputError):
    """Another run holds the output's lock. Exit code 75 (sysexits' EX_TEMPFAIL): retry later."""

    exit_code = 75


class MergeError(MergekitError):
    """The merge itself failed (for example a non-finite result). Exit code 1."""


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived (a CI runner cancelling the job): unwound exactly as Ctrl-C is. Exit code 143."""

    exit_code = 143
