"""ELAS model runtime: config, modules and checkpoint loader (installed as elas_serve.models)."""

from .attention import AttentionMetadata
from .config import CheckpointError, ElasConfig
from .layers import ProjSpec
from .llama import ElasForCausalLM, projection_names
from .loader import load_model
from .saver import save_checkpoint

__all__ = ["AttentionMetadata", "CheckpointError", "ElasConfig", "ElasForCausalLM", "ProjSpec",
           "load_model", "projection_names", "save_checkpoint"]
