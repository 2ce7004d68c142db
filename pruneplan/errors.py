"""The exception hierarchy: every error the library raises on bad input is a `PlanError`."""

from __future__ import annotations

__all__ = [
    "AlreadyPrunedError",
    "ConfigError",
    "CoupledGroupError",
    "CriterionError",
    "ExamplePassError",
    "OptimizerStateError",
    "OutputFileError",
    "PlanError",
    "PlanMismatchError",
    "PlanValidationError",
    "PlanningError",
    "UnexecutedModuleError",
    "UnsupportedOperationError",
    "WeightsContentWarning",
    "WeightsFileError",
    "quote",
]

#: characters of a bad value that a message quotes at most
QUOTE_LIMIT = 80


def quote(value: object, limit: int = QUOTE_LIMIT) -> str:
    """``repr(value)``, cut to about ``limit`` characters: messages never echo a huge value.

    A long string is quoted as its first ``limit`` characters plus its length; a long list or
    tuple as its first items plus its length; anything else as a cut ``repr``.
    """
    if isinstance(value, str):
        if len(value) <= limit:
            return repr(value)
        return f"{value[:limit]!r}... ({len(value)} characters)"
    if isinstance(value, list | tuple) and len(value) > 8:
        head = ", ".join(quote(v, limit // 8 + 8) for v in value[:8])
        return f"[{head}, ...] ({len(value)} items)"
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


class PlanError(Exception):
    """Base class of every error raised by pruneplan on bad input.

    The message says what is wrong and where (group, tensor, module, index, file).
    ``cli_message``, when set, is the same message in the command line's terms (``--force``
    instead of ``overwrite=True``); the CLI prints it instead of the message.
    """

    def __init__(self, message: str = "", *, cli_message: str | None = None) -> None:
        super().__init__(message)
        self.cli_message = cli_message


class PlanValidationError(PlanError, ValueError):
    """A plan document is malformed or breaks a rule of the plan format."""


class PlanMismatchError(PlanError):
    """A valid plan does not fit the model or weights it is applied to."""


class AlreadyPrunedError(PlanMismatchError):
    """The weights were already pruned by this very plan (their metadata records its digest
    and their shapes are the plan's pruned shapes)."""


class WeightsContentWarning(UserWarning):
    """The weights have the shapes a plan expects but not the content its metric scored."""


class WeightsFileError(PlanError):
    """A weights file cannot be read: missing, not safetensors, truncated, inconsistent."""


class OutputFileError(PlanError):
    """An output path is refused: it exists (without overwrite) or it is the input."""


class OptimizerStateError(PlanError):
    """An optimizer holds state for a pruned parameter that cannot be mapped."""


class PlanningError(PlanError):
    """A pruning request cannot be turned into a plan (unknown module, unsupported layer)."""


class UnsupportedOperationError(PlanningError):
    """An operation touches pruned channels in a way the library does not understand."""


class ExamplePassError(PlanningError):
    """The model's own forward pass fails on the example inputs given (wrong shape or dtype): the
    message names the module where it failed and the inputs' shapes; the model's exception is
    chained (``__cause__``). ``module``: the path of that module (``None``: the model's own
    forward, outside any submodule)."""

    module: str | None = None


class CriterionError(PlanningError):
    """The criterion does not fit the model's outputs and the data's targets (``cross_entropy``
    with one target per token, ``mse`` with class labels); the criterion's own exception is
    chained (``__cause__``)."""


class CoupledGroupError(PlanningError):
    """Indices were given for one member of a coupled group instead of the group."""


class UnexecutedModuleError(PlanningError):
    """Strict discovery: a module holding parameters was not executed by any example call."""


class ConfigError(PlanError):
    """A plan's widths break a model's config: grouped-query attention left uneven, or widths a
    Hugging Face config cannot express (one value for all layers, a derived head size)."""
