"""grass_optim: GRASS layer-wise importance sampling for memory-efficient full-parameter fine-tuning.

>>> from grass_optim import GrassAdamW
>>> opt = GrassAdamW(model, lr=1e-4, active_layers=2, switch_every=50)   # doctest: +SKIP
"""

from .config import GrassConfig
from .dcp import load_checkpoint, save_checkpoint
from .importance import block_grad_rms, ema_update, window_mean
from .layers import LayerPartition, find_layers, unwrap_model
from .memory import MemoryEstimate, MemoryReport, estimate_memory
from .optimizer import GrassAdamW
from .sampling import (
    GainSampler,
    GrassSampler,
    L1Sampler,
    Sampler,
    StaticSampler,
    UniformSampler,
    inclusion_probabilities,
    sample_without_replacement,
    scale_free_softmax,
)

__version__ = "0.1.0"

__all__ = [
    "GainSampler",
    "GrassAdamW",
    "GrassConfig",
    "GrassSampler",
    "L1Sampler",
    "LayerPartition",
    "MemoryEstimate",
    "MemoryReport",
    "Sampler",
    "StaticSampler",
    "UniformSampler",
    "block_grad_rms",
    "ema_update",
    "estimate_memory",
    "find_layers",
    "inclusion_probabilities",
    "load_checkpoint",
    "sample_without_replacement",
    "save_checkpoint",
    "scale_free_softmax",
    "unwrap_model",
    "window_mean",
]
