"""Checkpoint loading: config.json + weights -> `ElasForCausalLM` in the target dtype and device.

Accepted weight layouts (design section 3): `model.safetensors`; sharded safetensors with
`model.safetensors.index.json`; `pytorch_model.bin` (read with `weights_only=True`) or its sharded
index. Whether each projection is dense or LORO low-rank, and its rank, is read from the tensor
names and shapes. Everything is validated before any weight is materialised; any inconsistency
raises one `CheckpointError` naming the file and the tensor.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import CheckpointError, ElasConfig
from .layers import ProjSpec
from .llama import ElasForCausalLM, projection_names

# Buffers some exporters save (HF-4.28-style LLaMA port in the authors' code); not weights.
IGNORED = re.compile(r".*\.rotary_emb\.inv_freq$")


@dataclass(frozen=True, slots=True)
class TensorInfo:
    file: Path
    shape: tuple[int, ...]
    dtype: str


def find_weight_files(ckpt: Path) -> tuple[list[Path], str]:
    """The weight files of a checkpoint directory and their format ('safetensors' or 'bin')."""
    for index_name, fmt in (("model.safetensors.index.json", "safetensors"),
                            ("pytorch_model.bin.index.json", "bin")):
        index = ckpt / index_name
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                files = sorted({ckpt / name for name in weight_map.values()})
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
                raise CheckpointError(f"{index}: not a valid shard index ({e})") from None
            for f in files:
                if not f.exists():
                    raise CheckpointError(f"{index}: lists shard {f.name}, which does not exist")
            return files, fmt
    for name, fmt in (("model.safetensors", "safetensors"), ("pytorch_model.bin", "bin")):
        if (ckpt / name).exists():
            return [ckpt / name], fmt
    raise CheckpointError(f"{ckpt}: no weights found (expected model.safetensors, "
                          f"model.safetensors.index.json or pytorch_model.bin)")


@contextmanager
def _open_weights(path: Path, fmt: str, device: str = "cpu") -> Iterator[Any]:
    """A mapping-like view of one weight file: `.keys()` and `get(name) -> Tensor`."""
    try:
        if fmt == "safetensors":
            from safetensors import safe_open
            with safe_open(str(path), framework="pt", device=device) as f:
                yield _SafetensorsView(f)
        else:
            yield _DictView(torch.load(path, map_location=device, weights_only=True, mmap=True))
    except CheckpointError:
        raise
    except Exception as e:  # truncated, corrupt, or not a weight file at all
        raise CheckpointError(f"{path}: cannot read weights ({type(e).__name__}: {e})") from None


class _SafetensorsView:
    def __init__(self, f: Any):
        self.f = f

    def keys(self) -> list[str]:
        return list(self.f.keys())

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.f.get_slice(name).get_shape())

    def dtype(self, name: str) -> str:
        return str(self.f.get_slice(name).get_dtype())

    def get(self, name: str) -> torch.Tensor:
        return self.f.get_tensor(name)


class _DictView:
    def __init__(self, state: Any):
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ValueError("expected a flat dict of tensors")
        self.state = state

    def keys(self) -> list[str]:
        return list(self.state.keys())

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.state[name].shape)

    def dtype(self, name: str) -> str:
        return str(self.state[name].dtype)

    def get(self, name: str) -> torch.Tensor:
        return self.state[name]


def read_tensor_index(files: list[Path], fmt: str) -> dict[str, TensorInfo]:
    index: dict[str, TensorInfo] = {}
    for path in files:
        with _open_weights(path, fmt) as view:
            for name in view.keys():
                if name in index:
                    raise CheckpointError(f"{path}: tensor '{name}' also in {index[name].file.name}")
                index[name] = TensorInfo(path, view.shape(name), view.dtype(name))
    return index


def _check_shape(index: dict[str, TensorInfo], name: str, expected: tuple[int, ...], why: str) -> None:
    info = index[name]
    if info.shape != expected:
        raise CheckpointError(f"{info.file}: tensor '{name}' has shape {list(info.shape)}, "
                              f"expected {list(expected)} ({why})")


def infer_proj_specs(config: ElasConfig, index: dict[str, TensorInfo], where: Path
                     ) -> dict[str, ProjSpec]:
    """Dense or low-rank (and rank) of every projection, with every shape checked."""
    h, hd = config.hidden_size, config.head_dim
    q_out, kv_out, width = config.num_attention_heads * hd, config.num_key_value_heads * hd, config.ffn_width
    dims = {"q_proj": (h, q_out), "k_proj": (h, kv_out), "v_proj": (h, kv_out), "o_proj": (q_out, h),
            "gate_proj": (h, width), "up_proj": (h, width), "down_proj": (width, h)}
    width_why = (f"FFN width int(1.5 * intermediate_size={config.intermediate_size}) = {width} for "
                 f"squ_relu='relu2'" if config.ffn_kind == "relu2"
                 else f"FFN width intermediate_size={width} for SwiGLU")
    specs = {}
    for proj in projection_names(config):
        d_in, d_out = dims[proj.rsplit(".", 1)[1]]
        why = f"in={d_in}, out={d_out}" + (f"; {width_why}" if ".mlp." in proj else "")
        dense, w_in, w_out = f"{proj}.weight", f"{proj}.weight_in", f"{proj}.weight_out"
        if dense in index and (w_in in index or w_out in index):
            raise CheckpointError(f"{index[dense].file}: projection '{proj}' is stored both dense "
                                  f"('{dense}') and low-rank ('{w_in}'/'{w_out}')")
        if dense in index:
            _check_shape(index, dense, (d_out, d_in), why)
            rank = None
        elif w_in in index and w_out in index:
            rank = index[w_in].shape[-1] if len(index[w_in].shape) == 2 else -1
            _check_shape(index, w_in, (d_in, rank), f"low-rank weight_in is [in, r]; {why}")
            _check_shape(index, w_out, (d_out, rank), f"low-rank weight_out is [out, r] with "
                                                      f"r={rank} from weight_in; {why}")
        else:
            missing = w_out if w_in in index else w_in if w_out in index else dense
            alt = "" if w_in in index or w_out in index else f" (or '{w_in}' + '{w_out}')"
            raise CheckpointError(f"{where}: missing tensor '{missing}'{alt}")
        bias = f"{proj}.bias" in index
        if bias:
            _check_shape(index, f"{proj}.bias", (d_out,), why)
        specs[proj] = ProjSpec(rank=rank, bias=bias)
    return specs


def validate_tensor_names(config: ElasConfig, index: dict[str, TensorInfo],
                          expected: dict[str, tuple[int, ...]], where: Path) -> None:
    """No missing, unexpected or mis-shaped tensor (projections were checked with better
    messages by `infer_proj_specs`; the model was built from those, so they pass here)."""
    for name, shape in expected.items():
        if name not in index:
            raise CheckpointError(f"{where}: missing tensor '{name}'")
        _check_shape(index, name, shape, f"hidden_size={config.hidden_size}, "
                                         f"vocab_size={config.vocab_size}")
    for name, info in index.items():
        if name in expected or IGNORED.match(name):
            continue
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # NOTE: some exporters save the tied head anyway; the embedding is used.
        hint = ""
        m = re.match(r"model\.layers\.(\d+)\.", name)
        if m and int(m.group(1)) >= config.num_hidden_layers:
            hint = f" (config.json says num_hidden_layers={config.num_hidden_layers})"
        elif ".mlp.gate_proj." in name and config.ffn_kind == "relu2":
            hint = " (squ_relu='relu2' has no gate_proj)"
        raise CheckpointError(f"{info.file}: unexpected tensor '{name}'{hint}")


def load_model(path: str | Path, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu") -> ElasForCausalLM:
    """Load an ELAS (or plain LLaMA) checkpoint directory, validated, in `dtype` on `device`."""
    ckpt = Path(path)
    if not ckpt.is_dir():
        raise CheckpointError(f"{ckpt}: not a checkpoint directory")
    config = ElasConfig.from_file(ckpt / "config.json")
    files, fmt = find_weight_files(ckpt)
    index = read_tensor_index(files, fmt)
    where = files[0] if len(files) == 1 else files[0].parent
    specs = infer_proj_specs(config, index, where)
    with torch.device("meta"):
        model = ElasForCausalLM(config, specs)
    expected = {name: tuple(p.shape) for name, p in model.state_dict().items()}
    validate_tensor_names(config, index, expected, where)

    device = torch.device(device)
    state: dict[str, torch.Tensor] = {}
    for path_ in files:
        with _open_weights(path_, fmt, device="cpu" if fmt == "bin" else str(device)) as view:
            for name in view.keys():
                if name in expected:
                    t = view.get(name)
                    if not t.is_floating_point():
                        raise CheckpointError(f"{path_}: tensor '{name}' has dtype {t.dtype}, "
                                              f"expected a floating-point type")
                    if not torch.isfinite(t).all():
                        bad = (~torch.isfinite(t)).sum().item()
                        raise CheckpointError(f"{path_}: tensor '{name}' has {bad} non-finite value(s) "
                                              f"(NaN or inf): the checkpoint is broken")
                    state[name] = t.to(device=device, dtype=dtype)
                    if not torch.isfinite(state[name]).all():
                        raise CheckpointError(f"{path_}: tensor '{name}' overflows {dtype} (values up to "
                                              f"{t.abs().max().item():.3g}); serve it in another --dtype")
    model.load_state_dict(state, strict=True, assign=True)
    model.model.rotary_emb.inv_freq = model.model.rotary_emb.compute_inv_freq(device)
    return model.eval().requires_grad_(False)
