"""flashdecode: an LLM inference engine built on FlashDecoding++ (Hong et al., MLSys 2024)."""

from .config import EngineConfig
from .errors import (
    FlashDecodeError,
    InvalidPromptError,
    InvalidSamplingParamsError,
    ModelLoadError,
    PromptTooLongError,
    UnsupportedArchitectureError,
)
from .llm import LLM
from .outputs import CompletionOutput, Logprob, RequestOutput
from .sampling_params import SamplingParams

__version__ = "0.1.0"
__all__ = [
    "LLM",
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
