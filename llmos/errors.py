"""One error type per layer; the server maps each to an HTTP status once."""


class LLMOSError(Exception):
    """Base of every error llmos raises on purpose."""


class ModelLoadError(LLMOSError):
    """A model file or directory is missing, broken, or of a kind llmos cannot run."""


class InvalidRequestError(LLMOSError, ValueError):
    """A request or setting is malformed; the message names the field and why."""


class PromptTooLongError(InvalidRequestError):
    """The prompt (plus max_tokens) can never fit the model's context or the KV pool."""


class QueueFullError(LLMOSError):
    """A tenant's waiting queue is at its bound; retry later."""


QueueFull = QueueFullError
