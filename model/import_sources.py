"""Reading public MAE weights: official and timm `.pth` files, safetensors files, Hugging Face ViTMAE
directories (sharded or not), and the Hugging Face key names renamed to the official layout.

`model.importers` turns what is read here into a checkpoint of this project.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from model.checkpoint import CheckpointError

# Hugging Face ViTMAE -> official names.
_HF_TOP = {
    "embeddings.cls_token": "cls_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
    "decoder.mask_token": "mask_token",
    "decoder.decoder_pos_embed": "decoder_pos_embed",
    **{f"decoder.decoder_{m}.{p}": f"decoder_{m}.{p}" for m in ("embed", "norm", "pred") for p in ("weight", "bias")},
}
_HF_ENCODER_LAYER = re.compile(r"(?:encoder\.layers?|layers)\.(\d+)\.(.+)\.(weight|bias)")
_HF_DECODER_LAYER = re.compile(r"decoder\.(?:decoder_layers|decoder_encoder\.layers?)\.(\d+)\.(.+)\.(weight|bias)")
_HF_LAYER_MODULES = {  # 4.x hub names and transformers-5 names
    "attention.attention.query": "attn.q", "attention.q_proj": "attn.q",
    "attention.attention.key": "attn.k", "attention.k_proj": "attn.k",
    "attention.attention.value": "attn.v", "attention.v_proj": "attn.v",
    "attention.output.dense": "attn.proj", "attention.o_proj": "attn.proj",
    "intermediate.dense": "mlp.fc1", "mlp.fc1": "mlp.fc1",
    "output.dense": "mlp.fc2", "mlp.fc2": "mlp.fc2",
    "layernorm_before": "norm1", "layernorm_after": "norm2",
}
_HF_TOP_LEVEL = {"vit", "embeddings", "encoder", "layers", "layernorm", "decoder"}
_HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


@dataclass(frozen=True, kw_only=True)
class Source:
    """What was read from SRC: the tensors, the Hugging Face configs (if any) and a format label."""

    state_dict: dict[str, Tensor]
    fmt: str
    hf_config: dict[str, Any] | None = None
    preprocessor: dict[str, Any] | None = None


# --- reading -------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e


def _load_safetensors(path: Path) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and weights_only errors all mean "cannot use this file"
        raise CheckpointError(
            f"{path}: cannot be loaded with torch.load(weights_only=True) ({e.__class__.__name__}: {e}); "
            "re-save its state dict alone (torch.save(ckpt['model'], ...)) if it holds other Python objects"
        ) from e


def _hf_config_for(directory: Path) -> dict[str, Any] | None:
    """The ViTMAEConfig beside the weights; a config.json without `model_type` (timm's) is ignored."""
    config = _read_json(directory / "config.json")
    if config is None or "model_type" not in config:
        return None
    if config["model_type"] != "vit_mae":
        raise CheckpointError(f"{directory / 'config.json'}: model_type {config['model_type']!r}, not 'vit_mae'")
    return config


def _read_hf_dir(directory: Path) -> dict[str, Tensor]:
    index = directory / "model.safetensors.index.json"
    if (directory / "model.safetensors").is_file():
        return _load_safetensors(directory / "model.safetensors")
    if index.is_file():
        weight_map = (_read_json(index) or {}).get("weight_map", {})
        sd: dict[str, Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            sd.update(_load_safetensors(directory / shard))
        return sd
    if (directory / "pytorch_model.bin").is_file():
        return _as_state_dict(_torch_load(directory / "pytorch_model.bin"), directory / "pytorch_model.bin")
    raise CheckpointError(f"{directory}: no weights found (looked for {', '.join(_HF_WEIGHT_FILES)})")


def _as_state_dict(obj: Any, path: Path) -> dict[str, Tensor]:
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    if "config" in obj and "kind" in obj:
        raise CheckpointError(f"{path}: already a checkpoint of this project; nothing to import")
    for wrapper in ("model", "state_dict"):
        if isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
            break
    not_tensors = sorted(str(k) for k, v in obj.items() if not isinstance(v, Tensor))
    if not_tensors or not obj:
        raise CheckpointError(
            f"{path}: not a state dict (entries that are not tensors: {not_tensors[:20]}); "
            "expected an official/timm .pth, a Hugging Face ViTMAE directory or a .safetensors file"
        )
    if all(k.startswith("module.") for k in obj):  # saved from a DistributedDataParallel wrapper
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def read_source(src: str | Path) -> Source:
    """Read SRC (a file or a Hugging Face directory) into tensors plus the configs found beside them."""
    path = Path(src)
    if path.is_dir() or path.suffix == ".safetensors":
        directory = path if path.is_dir() else path.parent
        if path.is_dir():
            sd = _read_hf_dir(path)
        elif path.is_file():
            sd = _load_safetensors(path)
        else:
            raise CheckpointError(f"{path}: no such file")
        return Source(state_dict=sd, fmt="huggingface" if is_hf_layout(sd) else "timm",
                      hf_config=_hf_config_for(directory),
                      preprocessor=_read_json(directory / "preprocessor_config.json"))
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file or directory")
    obj = _torch_load(path)
    wrapped = isinstance(obj, dict) and isinstance(obj.get("model"), dict)
    sd = _as_state_dict(obj, path)
    return Source(state_dict=sd, fmt="huggingface" if is_hf_layout(sd) else "official" if wrapped else "timm")


# --- renaming ------------------------------------------------------------------------------------


def is_hf_layout(sd: dict[str, Tensor]) -> bool:
    return any(k.split(".", 1)[0] in _HF_TOP_LEVEL for k in sd)


def hf_to_official(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename Hugging Face ViTMAE keys to the official layout and fuse q/k/v; unknown keys pass unchanged."""
    out: dict[str, Tensor] = {}
    parts: dict[str, dict[str, tuple[str, Tensor]]] = {}  # fused name -> {q|k|v: (source name, tensor)}
    for name, tensor in sd.items():
        key = name[len("vit."):] if name.startswith("vit.") else name
        if key in _HF_TOP:
            out[_HF_TOP[key]] = tensor
            continue
        m, prefix = _HF_ENCODER_LAYER.fullmatch(key), "blocks"
        if m is None:
            m, prefix = _HF_DECODER_LAYER.fullmatch(key), "decoder_blocks"
        module = _HF_LAYER_MODULES.get(m.group(2)) if m else None
        if m is None or module is None:
            out[name] = tensor  # reported as unexpected by the strict load
            continue
        index, param = m.group(1), m.group(3)
        if module in ("attn.q", "attn.k", "attn.v"):
            parts.setdefault(f"{prefix}.{index}.attn.qkv.{param}", {})[module[-1]] = (name, tensor)
        else:
            out[f"{prefix}.{index}.{module}.{param}"] = tensor
    for fused, qkv in parts.items():
        if set(qkv) == {"q", "k", "v"}:
            out[fused] = torch.cat([qkv["q"][1], qkv["k"][1], qkv["v"][1]], dim=0)
        else:  # incomplete: keep the originals so that the report names them
            out.update(dict(qkv.values()))
    return out
