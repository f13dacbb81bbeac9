"""elas-serve: an inference server for ELAS activation-sparse low-rank LLaMA checkpoints.

`LLM` and `SamplingParams` are imported lazily so that light submodules (the HTTP clients) do not
pull in torch.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "LLM":
        from elas_serve.llm import LLM
        return LLM
    if name == "SamplingParams":
        from elas_serve.sampling_params import SamplingParams
        return SamplingParams
    raise AttributeError(f"module 'elas_serve' has no attribute {name!r}")
