"""One error family, so callers (and the CLI) can catch ours and nothing else.

Every message names the value, the limit and the fix.
"""

from __future__ import annotations


class EdgeLLMError(Exception):
    """Base of every error edgellm raises on purpose."""


class ModelFormatError(EdgeLLMError):
    """A model folder or source file is missing, corrupt, tampered with or of an unknown kind."""


class ChatTemplateError(ModelFormatError):
    """The model's chat template does not compile, fails, or breaks the size or time limit of rendering."""


class UnsupportedArchitectureError(ModelFormatError):
    """The source model is of an architecture the converter cannot build."""


class ContextLengthError(EdgeLLMError, ValueError):
    """A prompt (plus the tokens asked for) does not fit the model's context window."""


class InvalidParameterError(EdgeLLMError, ValueError):
    """A generation or conversion setting is out of range."""


class ConstraintError(InvalidParameterError):
    """A json_schema, regex or grammar is invalid, or allows no output at all."""


class ProviderError(EdgeLLMError):
    """An execution provider was asked for that this onnxruntime build does not have."""


class KernelError(EdgeLLMError):
    """edgellm's own CPU kernels were required (load(..., kernels=True), EDGELLM_KERNELS=1) and cannot run here."""


class MissingDependencyError(EdgeLLMError, ImportError):
    """An optional dependency is needed; the message carries the pip line that installs it."""

    def __init__(self, package: str, extra: str, purpose: str) -> None:
        super().__init__(
            f"{purpose} needs the '{package}' package, which is not installed. "
            f"Fix: pip install 'edgellm[{extra}]'"
        )
        self.package = package
        self.extra = extra


class OutputExistsError(EdgeLLMError):
    """The output folder exists and --force was not given."""


class ValidationError(EdgeLLMError):
    """The converted model failed its quality gate; carries the measured numbers."""

    def __init__(self, message: str, report: dict | None = None) -> None:
        super().__init__(message)
        self.report = report or {}


class OutputError(EdgeLLMError):
    """An output folder cannot be written there: its parent is a file, read-only, or the disk is full."""


class StoppedBySignal(EdgeLLMError):
    """A long job (convert) was stopped by SIGTERM or SIGHUP; it cleaned up what it had started."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum  # what a shell reports for a process killed by that signal
