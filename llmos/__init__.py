"""llmos: an operating system for large language models."""

from llmos.errors import InvalidRequestError, LLMOSError, ModelLoadError, PromptTooLongError, QueueFull
from llmos.outputs import RequestMetrics, RequestOutput, StreamDelta
from llmos.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "RequestMetrics", "StreamDelta", "LLMOSError",
           "ModelLoadError", "InvalidRequestError", "PromptTooLongError", "QueueFull"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # LLM pulls in torch and the engine; import it only when asked for, so the CLI starts fast.
    if name == "LLM":
        from llmos.api.llm import LLM
        return LLM
    raise AttributeError(name)
