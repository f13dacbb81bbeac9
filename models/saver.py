"""Checkpoint writing: `ElasForCausalLM` -> a directory `load_model` reads with no conversion.

Owns the on-disk format of design section 3 from the writer's side (the loader owns the reader's):
- `config.json`: the authors' HF-4.28 `LlamaConfig` fields, plus the ELAS runtime fields their
  `run_c4.py` writes (`squ_relu`, `activation_2by4`, `activation_sparse_method`,
  `activation_dense_warmup_steps`, ...) when the FFN is squared ReLU (or `squ_relu: "silu"` for
  the SwiGLU baseline), so the same file also loads in the authors' code;
- `model.safetensors`: `model.state_dict()` under its own names (they are the checkpoint's tensor
  names: LORO `weight_in` [in, r] / `weight_out` [out, r], dense `weight` [out, in]);
- optionally a copy of the tokenizer as `tokenizer.json`.
Invariant: `load_model(save_checkpoint(model, d))` rebuilds the same modules and tensors
(in the saved dtype).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .config import ElasConfig
from .llama import ElasForCausalLM

# Runtime fields the authors' trainer writes next to the LlamaConfig, with their defaults.
AUTHORS_ELAS_FIELDS: dict[str, Any] = {
    "wandb_sparsityrelu": False, "activation_sparse_method": "naive",
    "activation_dense_warmup_steps": 0, "dx_direct_sparse": 1, "dynamic_activation_steps": 10,
    "activation_calibration_samples": 100, "permute_2by4": False,
}


def authors_config_dict(config: ElasConfig, dtype: torch.dtype,
                        training_fields: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The config.json an authors' checkpoint of this model would carry."""
    cfg: dict[str, Any] = {
        "architectures": ["LLaMAForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "num_hidden_layers": config.num_hidden_layers, "vocab_size": config.vocab_size,
        "rms_norm_eps": config.rms_norm_eps, "rope_theta": config.rope_theta,
        "initializer_range": 0.02, "max_position_embeddings": config.max_position_embeddings,
        "max_sequence_length": config.max_position_embeddings,
        "pad_token_id": -1, "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id, "use_cache": True,
        "tie_word_embeddings": config.tie_word_embeddings,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    if config.head_dim != config.hidden_size // config.num_attention_heads:
        cfg["head_dim"] = config.head_dim
    if config.squ_relu is not None:
        cfg.update(AUTHORS_ELAS_FIELDS)
        cfg.update({"squ_relu": config.squ_relu, "activation_2by4": config.activation_2by4,
                    "activation_sparse_method": config.activation_sparse_method})
    for key, value in (training_fields or {}).items():
        if key in ElasConfig.__dataclass_fields__:
            raise ValueError(f"training field {key!r} would override the model config")
        cfg[key] = value
    return cfg


def save_checkpoint(model: ElasForCausalLM, path: str | Path, *, dtype: torch.dtype | None = None,
                    tokenizer_file: str | Path | None = None,
                    training_fields: Mapping[str, Any] | None = None) -> Path:
    """Write `model` as a checkpoint directory at `path` (created); returns the path.

    `dtype` casts floating tensors (default: as they are); `training_fields` are extra config.json
    keys such as `activation_dense_warmup_steps` (never model-shape fields).
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {name: t.detach().to("cpu", dtype or t.dtype).contiguous()
             for name, t in model.state_dict().items()}
    saved_dtype = dtype or next(iter(state.values())).dtype
    config = authors_config_dict(model.config, saved_dtype, training_fields)
    # NOTE: write to temporary names and rename, so an interrupted save never leaves a
    # truncated file that looks like a checkpoint.
    save_file(state, str(path / "model.safetensors.tmp"), metadata={"format": "pt"})
    (path / "config.json.tmp").write_text(json.dumps(config, indent=2) + "\n")
    (path / "model.safetensors.tmp").replace(path / "model.safetensors")
    (path / "config.json.tmp").replace(path / "config.json")
    if tokenizer_file is not None and Path(tokenizer_file).resolve() != (path / "tokenizer.json").resolve():
        shutil.copyfile(tokenizer_file, path / "tokenizer.json")
    return path
