"""Typed errors. Every user-facing failure is a ``ValueError`` subclass naming the problem, so API
callers can catch one type and the CLI can print one line instead of a traceback."""


class FlashDecodeError(ValueError):
    """Base class of every error flashdecode raises for bad input."""


class ModelLoadError(FlashDecodeError):
    """The model path does not exist, is not a model, or its files are malformed or truncated."""


class UnsupportedArchitectureError(ModelLoadError):
    """The model's architecture is not one flashdecode implements."""


class InvalidSamplingParamsError(FlashDecodeError):
    """A sampling parameter is outside its valid range."""


class PromptTooLongError(FlashDecodeError):
    """The prompt (plus at least one generated token) does not fit in ``max_model_len``."""


class InvalidPromptError(FlashDecodeError):
    """The prompt is empty or of an unsupported form."""


class DistributedError(FlashDecodeError):
    """A tensor-parallel group could not form, or one of its ranks died or stopped answering."""
