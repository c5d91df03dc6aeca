"""flashdecode: an LLM inference engine built on FlashDecoding++ (Hong et al., MLSys 2024)."""

from ._version import __version__
from .config import EngineConfig
from .entrypoints.async_engine import AsyncLLMEngine
from .entrypoints.llm import LLM
from .errors import (
    FlashDecodeError,
    InvalidPromptError,
    InvalidSamplingParamsError,
    ModelLoadError,
    PromptTooLongError,
    UnsupportedArchitectureError,
)
from .outputs import CompletionOutput, Logprob, RequestOutput
from .sampling_params import SamplingParams

__all__ = [
    "__version__",
    "LLM",
    "AsyncLLMEngine",
    "SamplingParams",
    "RequestOutput",
    "CompletionOutput",
    "Logprob",
    "EngineConfig",
    "FlashDecodeError",
    "ModelLoadError",
    "UnsupportedArchitectureError",
    "InvalidSamplingParamsError",
    "PromptTooLongError",
    "InvalidPromptError",
]
