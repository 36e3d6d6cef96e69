"""The serving backend: a resident Llama-family base, adapter slots, continuous batching."""

from mintvcs.serve.adapters import (
    AdapterNotFound,
    AdapterRefused,
    AdapterSource,
    AdapterWeights,
    HostAdapter,
    PeftDirSource,
    StoreSource,
    prepare_adapter,
)
from mintvcs.serve.engine import (
    Completion,
    Engine,
    EngineClosed,
    EngineConfig,
    EngineError,
    InvalidRequest,
    RequestStream,
)
from mintvcs.serve.loader import CheckpointError, ModelConfig, UnsupportedModelError
from mintvcs.serve.model import LORA_MODULES, Model
from mintvcs.serve.sampling import InvalidSamplingParams, SamplingParams, TokenLogprobs
from mintvcs.serve.scheduler import RequestCancelled, TokenEvent

__all__ = [
    "LORA_MODULES",
    "AdapterNotFound",
    "AdapterRefused",
    "AdapterSource",
    "AdapterWeights",
    "CheckpointError",
    "Completion",
    "Engine",
    "EngineClosed",
    "EngineConfig",
    "EngineError",
    "HostAdapter",
    "InvalidRequest",
    "InvalidSamplingParams",
    "Model",
    "ModelConfig",
    "PeftDirSource",
    "RequestCancelled",
    "RequestStream",
    "SamplingParams",
    "StoreSource",
    "TokenEvent",
    "TokenLogprobs",
    "UnsupportedModelError",
    "prepare_adapter",
]
