"""elas-serve: an inference server for ELAS activation-sparse low-rank LLaMA checkpoints."""

__version__ = "0.1.0"
