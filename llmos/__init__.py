"""llmos: an operating system for large language models."""

import os

# Idle OpenMP threads sleep instead of spinning: on a small shared CPU, spinning workers
# steal the cores the engine's other threads (HTTP, tokenization) and neighbours need.
# Only effective when llmos is imported before torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from llmos.errors import InvalidRequestError, LLMOSError, ModelLoadError, PromptTooLongError, QueueFull
from llmos.outputs import RequestMetrics, RequestOutput, StreamDelta
from llmos.sampling_params import SamplingParams
from llmos.tools.registry import ToolContext, tool

__all__ = ["LLM", "SamplingParams", "RequestOutput", "RequestMetrics", "StreamDelta", "LLMOSError",
           "ModelLoadError", "InvalidRequestError", "PromptTooLongError", "QueueFull", "tool", "ToolContext"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # LLM pulls in torch and the engine; import it only when asked for, so the CLI starts fast.
    if name == "LLM":
        from llmos.api.llm import LLM
        return LLM
    raise AttributeError(name)
