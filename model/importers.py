"""`mae-import`: convert public MAE checkpoints into checkpoints of this project.

Recognised sources (reference/mae_facts.md §1, §3, §4, §7):

- official `.pth` files of facebookresearch/mae, the state dict under `model`: encoder-only
  `mae_pretrain_*` (kind `encoder`), `*_full` and `mae_visualize_*` (kind `mae`), fine-tuned
  `mae_finetuned_*` with `fc_norm` + `head` (kind `finetune`, labels are class indices);
- timm state dicts (the same names, bare or under `model` / `state_dict`); a timm classifier with
  `norm` + `head` (cls-token pooling) becomes kind `probe` with an identity BatchNorm;
- Hugging Face ViTMAE (`ViTMAEForPreTraining`, `ViTMAEModel`): a directory with `config.json` and
  `model.safetensors` (or its sharded index, or `pytorch_model.bin`), or the weights file itself;
  hub names (`vit.encoder.layer.N.attention.attention.query.*`, `decoder.decoder_layers.N.*`) and
  the transformers-5 spellings (`vit.layers.N.attention.q_proj.*`, `decoder.decoder_encoder.layer.N.*`);
  split q/k/v are fused into `qkv` by rows (q, k, v).

The architecture comes from `config.json` (Hugging Face) or from tensor shapes. Shapes cannot
tell the number of heads: in order of precedence, `--num-heads` / `--decoder-num-heads`, the
named config (`--config-name`), `config.json`, a named config with the same shapes, and last
`embed_dim // 64` (encoder) and `decoder_embed_dim // 32` (decoder; the official ratio 512/16).
`norm_pix_loss`: the flag, `config.json`, the official file name (`mae_pretrain_*` files are
norm-pix, `mae_visualize_*` are not), the named config, else False. `layer_norm_eps`: the flag,
`config.json`, the named config, else 1e-12 for Hugging Face weights and 1e-6 for the others.
Preprocessing mean/std: `preprocessor_config.json` when present, else ImageNet's for 3 channels.

The converted state dict is loaded strictly into the model of its kind before anything is written;
anything unrecognised fails with the lists of missing and unexpected keys.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from model.checkpoint import Checkpoint, CheckpointError, ClassifierRecord
from model.configs import CONFIGS, MAEConfig
from model.import_sources import hf_to_official, is_hf_layout, read_source
from model.mae import EncoderOnlyMAE, MaskedAutoencoderViT, ViTClassifier, probe_head
from model.stats import IMAGENET_MEAN, IMAGENET_STD

_DECODER_PREFIXES = ("decoder_embed.", "mask_token", "decoder_pos_embed", "decoder_blocks.", "decoder_norm.",
                     "decoder_pred.")
_BLOCK_PARAMS = ("norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
                 "attn.proj.bias", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias",
                 "mlp.fc2.weight", "mlp.fc2.bias")
_REQUIRED = ("cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias",
             *(f"blocks.0.{k}" for k in _BLOCK_PARAMS))
_OFFICIAL_KEY = re.compile(
    r"(cls_token|pos_embed|mask_token|decoder_pos_embed|patch_embed\.proj\.(weight|bias)"
    r"|(norm|fc_norm|decoder_norm|decoder_embed|decoder_pred|head)\.(weight|bias)"
    r"|(blocks|decoder_blocks)\.\d+\.(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.(weight|bias)"
    r"|head\.0\.(running_mean|running_var|num_batches_tracked)|head\.1\.(weight|bias))"
)


def _key_report(missing: Sequence[str], unexpected: Sequence[str], limit: int = 40) -> str:
    def fmt(keys: Sequence[str]) -> str:
        keys = sorted(keys)
        more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
        return "[" + ", ".join(keys[:limit]) + "]" + more

    return f"missing keys {fmt(missing)}; unexpected keys {fmt(unexpected)}"


# --- architecture --------------------------------------------------------------------------------


def _layer_count(sd: dict[str, Tensor], prefix: str) -> int:
    indices = {int(m.group(1)) for k in sd if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    return max(indices) + 1 if indices else 0


def _infer_shapes(sd: dict[str, Tensor]) -> dict[str, Any]:
    """The MAEConfig fields that the tensors determine (decoder ones only when a decoder is present)."""
    absent = [k for k in _REQUIRED if k not in sd]
    if absent:
        unexpected = [k for k in sd if not _OFFICIAL_KEY.fullmatch(k)]
        raise CheckpointError(f"not an MAE / ViT checkpoint: {_key_report(absent, unexpected)}")
    w = sd["patch_embed.proj.weight"]
    if w.ndim != 4 or w.shape[2] != w.shape[3]:
        raise CheckpointError(f"patch_embed.proj.weight has shape {tuple(w.shape)}; expected [D, C, p, p]")
    embed_dim, in_chans, patch = int(w.shape[0]), int(w.shape[1]), int(w.shape[2])
    if sd["pos_embed"].ndim != 3:
        raise CheckpointError(f"pos_embed has shape {tuple(sd['pos_embed'].shape)}; expected [1, 1 + L, D]")
    n_patches = sd["pos_embed"].shape[1] - 1
    grid = math.isqrt(n_patches)
    if grid * grid != n_patches:
        raise CheckpointError(f"pos_embed has {n_patches} patch positions, not a square grid")
    shapes: dict[str, Any] = dict(
        img_size=grid * patch, patch_size=patch, in_chans=in_chans, embed_dim=embed_dim,
        depth=_layer_count(sd, "blocks."), mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / embed_dim,
    )
    if "decoder_embed.weight" in sd:
        dec_dim = int(sd["decoder_embed.weight"].shape[0])
        shapes.update(decoder_embed_dim=dec_dim, decoder_depth=_layer_count(sd, "decoder_blocks."))
        fc1 = sd.get("decoder_blocks.0.mlp.fc1.weight")
        if fc1 is not None and fc1.shape[0] / dec_dim != shapes["mlp_ratio"]:
            raise CheckpointError(
                f"decoder MLP ratio {fc1.shape[0] / dec_dim} differs from the encoder's {shapes['mlp_ratio']}; "
                "this model uses one mlp_ratio for both"
            )
    return shapes


def _hf_fields(hf: dict[str, Any], with_decoder: bool) -> dict[str, Any]:
    """MAEConfig fields named by a Hugging Face ViTMAEConfig (config.json)."""
    def square(v: Any, what: str) -> int:
        if isinstance(v, (list, tuple)):
            if len(set(v)) != 1:
                raise CheckpointError(f"config.json: non-square {what} {v} is not supported")
            v = v[0]
        return int(v)

    if hf.get("hidden_act", "gelu") != "gelu":
        raise CheckpointError(f"config.json: hidden_act {hf['hidden_act']!r} is not supported (only exact 'gelu')")
    if not hf.get("qkv_bias", True):
        raise CheckpointError("config.json: qkv_bias false is not supported (the official blocks have qkv bias)")
    hidden = int(hf.get("hidden_size", 768))
    fields: dict[str, Any] = dict(
        img_size=square(hf.get("image_size", 224), "image_size"), patch_size=square(hf.get("patch_size", 16), "patch_size"),
        in_chans=int(hf.get("num_channels", 3)), embed_dim=hidden, depth=int(hf.get("num_hidden_layers", 12)),
        num_heads=int(hf.get("num_attention_heads", 12)),
        mlp_ratio=int(hf.get("intermediate_size", 3072)) / hidden,
        norm_pix_loss=bool(hf.get("norm_pix_loss", False)), layer_norm_eps=float(hf.get("layer_norm_eps", 1e-12)),
    )
    if with_decoder:
        fields.update(decoder_embed_dim=int(hf.get("decoder_hidden_size", 512)),
                      decoder_depth=int(hf.get("decoder_num_hidden_layers", 8)),
                      decoder_num_heads=int(hf.get("decoder_num_attention_heads", 16)))
    return fields


def _check_agree(shapes: dict[str, Any], other: dict[str, Any], what: str) -> None:
    diff = [f"{k} {other[k]} (weights: {v})" for k, v in shapes.items() if k in other and other[k] != v]
    if diff:
        raise CheckpointError(f"{what} disagrees with the weights: {', '.join(diff)}")


def _named_match(shapes: dict[str, Any], fields: Sequence[str]) -> MAEConfig | None:
    for config in CONFIGS.values():
        d = config.to_dict()
        if all(d[f] == shapes[f] for f in fields if f in shapes):
            return config
    return None


def _default_heads(dim: int, head_dim: int, flag: str) -> int:
    if dim % head_dim or dim < head_dim:
        raise CheckpointError(f"cannot infer the number of heads for width {dim}; pass {flag} or --config-name")
    return dim // head_dim


def infer_config(sd: dict[str, Tensor], *, hf: dict[str, Any] | None = None, hf_names: bool = False,
                 config_name: str | None = None, norm_pix_loss: bool | None = None,
                 layer_norm_eps: float | None = None, num_heads: int | None = None,
                 decoder_num_heads: int | None = None, file_name: str = "") -> MAEConfig:
    """The MAEConfig of an official-layout state dict, with the precedence given in the module docstring."""
    shapes = _infer_shapes(sd)
    has_decoder = "decoder_embed_dim" in shapes
    fields: dict[str, Any] = {}
    named = None
    if config_name is not None:
        if config_name not in CONFIGS:
            raise CheckpointError(f"unknown --config-name {config_name!r}; known: {', '.join(sorted(CONFIGS))}")
        named = CONFIGS[config_name]
        _check_agree(shapes, named.to_dict(), f"config {config_name!r}")
        fields.update(named.to_dict())
    if hf is not None:
        hf_fields = _hf_fields(hf, has_decoder)
        _check_agree(shapes, hf_fields, "config.json")
        fields.update({k: v for k, v in hf_fields.items() if named is None or k in ("norm_pix_loss", "layer_norm_eps")})
    else:
        if named is None:
            enc = _named_match(shapes, ("patch_size", "in_chans", "embed_dim", "depth", "mlp_ratio"))
            fields["num_heads"] = enc.num_heads if enc else _default_heads(shapes["embed_dim"], 64, "--num-heads")
            if has_decoder:
                dec = _named_match(shapes, ("decoder_embed_dim", "decoder_depth"))
                fields["decoder_num_heads"] = (dec.decoder_num_heads if dec else
                                               _default_heads(shapes["decoder_embed_dim"], 32, "--decoder-num-heads"))
            fields["layer_norm_eps"] = 1e-12 if hf_names else 1e-6
        if file_name.startswith("mae_pretrain_"):
            fields["norm_pix_loss"] = True
        elif file_name.startswith("mae_visualize_"):
            fields["norm_pix_loss"] = False
    fields.update(shapes)
    for key, value in (("num_heads", num_heads), ("decoder_num_heads", decoder_num_heads),
                       ("norm_pix_loss", norm_pix_loss), ("layer_norm_eps", layer_norm_eps)):
        if value is not None:
            fields[key] = value
    try:
        return MAEConfig.from_dict({**MAEConfig().to_dict(), **fields})
    except ValueError as e:
        raise CheckpointError(f"inconsistent architecture: {e}") from e


# --- kinds and verification ----------------------------------------------------------------------


def detect_kind(sd: dict[str, Tensor]) -> str:
    """`finetune` (fc_norm + head), `probe` (norm + head), `mae` (with a decoder) or `encoder`."""
    if any(k.startswith("head.") for k in sd):
        return "finetune" if "fc_norm.weight" in sd else "probe"
    return "mae" if any(k.startswith(_DECODER_PREFIXES) for k in sd) else "encoder"


def split_probe_head(sd: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(model state dict, probe head state dict) for an official linear probe or a timm token classifier.

    The official probe head is `Sequential(BatchNorm1d(affine=False), Linear)`; a timm head is one
    Linear on the cls token after `norm`, kept exact by a BatchNorm with mean 0 and var 1 - eps.
    """
    model = dict(sd)
    if "head.1.weight" in sd:
        names = ("0.running_mean", "0.running_var", "0.num_batches_tracked", "1.weight", "1.bias")
        return model, {n: model.pop(f"head.{n}") for n in names if f"head.{n}" in model}
    if "head.weight" not in sd or "head.bias" not in sd:
        raise CheckpointError(f"unrecognised classifier head: {sorted(k for k in sd if k.startswith('head.'))}")
    weight, bias = model.pop("head.weight"), model.pop("head.bias")
    dim = weight.shape[1]
    head = {"0.running_mean": torch.zeros(dim), "0.running_var": torch.full((dim,), 1.0 - 1e-6),
            "0.num_batches_tracked": torch.tensor(0), "1.weight": weight, "1.bias": bias}
    return model, head


def _strict_load(model: nn.Module, sd: dict[str, Tensor], what: str) -> None:
    try:
        missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
    except RuntimeError as e:  # shape mismatches
        raise CheckpointError(f"{what}: {e}") from e
    if missing or unexpected:
        raise CheckpointError(f"{what} does not match the architecture: {_key_report(missing, unexpected)}")


def verify_checkpoint(ckpt: Checkpoint) -> None:
    """Load the checkpoint's tensors strictly into its model (built on the meta device: no init cost)."""
    config, kind, info = ckpt.config, ckpt.kind, ckpt.classifier
    with torch.device("meta"):
        if kind == "finetune":
            model: nn.Module = ViTClassifier(config, num_classes=info.num_classes, head_type="finetune",
                                             pooling="mean")
        elif kind == "mae" or ckpt.has_decoder():
            model = MaskedAutoencoderViT(config)
        else:
            model = EncoderOnlyMAE(config)
        head = probe_head(config.embed_dim, info.num_classes) if kind == "probe" else None
    _strict_load(model, ckpt.model, f"{kind} checkpoint")
    if head is not None:
        _strict_load(head, info.state_dict, "probe head")


# --- the API and the CLI -------------------------------------------------------------------------


def import_checkpoint(src: str | Path, *, config_name: str | None = None, norm_pix_loss: bool | None = None,
                      layer_norm_eps: float | None = None, num_heads: int | None = None,
                      decoder_num_heads: int | None = None) -> Checkpoint:
    """Read SRC, convert it and return a verified checkpoint dict of this project (nothing written)."""
    source = read_source(src)
    hf_names = is_hf_layout(source.state_dict)
    sd = hf_to_official(source.state_dict) if hf_names else dict(source.state_dict)
    sd = {k: v.float().contiguous() if v.is_floating_point() else v for k, v in sd.items()}
    kind = detect_kind(sd)
    config = infer_config(
        sd, hf=source.hf_config, hf_names=hf_names, config_name=config_name, norm_pix_loss=norm_pix_loss,
        layer_norm_eps=layer_norm_eps, num_heads=num_heads, decoder_num_heads=decoder_num_heads,
        file_name=Path(src).name,
    )
    classifier = None
    if kind == "probe":
        sd, head = split_probe_head(sd)
        classifier = ClassifierRecord(head_type="probe", pooling="cls", num_classes=int(head["1.weight"].shape[0]),
                                      state_dict=head)
    elif kind == "finetune":
        classifier = ClassifierRecord(head_type="finetune", pooling="mean", num_classes=int(sd["head.weight"].shape[0]))
    pre = source.preprocessor or {}
    imagenet = config.in_chans == 3
    ckpt = Checkpoint(
        model=sd, config=config, kind=kind, classifier=classifier,
        args={"source": str(src), "format": source.fmt, "config_name": config_name},
        data={"dataset": None, "labels": None,
              "mean": pre.get("image_mean", list(IMAGENET_MEAN) if imagenet else None),
              "std": pre.get("image_std", list(IMAGENET_STD) if imagenet else None)},
    )
    verify_checkpoint(ckpt)
    return ckpt


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mae-import",
        description="Convert an official MAE .pth, a timm state dict or a Hugging Face ViTMAE model "
                    "into a checkpoint of this project.",
    )
    p.add_argument("src", type=Path, help="a .pth / .bin / .safetensors file or a Hugging Face model directory")
    p.add_argument("--out", type=Path, required=True, help="the checkpoint to write")
    p.add_argument("--config-name", choices=sorted(CONFIGS), help="take the architecture from this named config")
    p.add_argument("--norm-pix-loss", action=argparse.BooleanOptionalAction, default=None,
                   help="whether the decoder predicts per-patch normalised pixels (default: inferred)")
    p.add_argument("--layer-norm-eps", type=float, help="LayerNorm epsilon (default: inferred)")
    p.add_argument("--num-heads", type=int, help="encoder attention heads (default: inferred)")
    p.add_argument("--decoder-num-heads", type=int, help="decoder attention heads (default: inferred)")
    return p


def main(args: argparse.Namespace) -> Checkpoint:
    ckpt = import_checkpoint(args.src, config_name=args.config_name, norm_pix_loss=args.norm_pix_loss,
                             layer_norm_eps=args.layer_norm_eps, num_heads=args.num_heads,
                             decoder_num_heads=args.decoder_num_heads)
    ckpt.save(args.out)
    return ckpt


def cli(argv: Sequence[str] | None = None) -> None:
    """Entry point of `mae-import`; any failure prints one line and exits with status 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        ckpt = main(args)
    except (CheckpointError, OSError) as e:
        print(f"mae-import: error: {e}", file=sys.stderr)
        raise SystemExit(2) from e
    c = ckpt.config
    print(f"mae-import: {ckpt.args['format']} -> kind {ckpt.kind}, ViT {c.embed_dim}d x{c.depth} "
          f"({c.num_heads} heads), patch {c.patch_size}, {c.img_size}px, norm_pix_loss={c.norm_pix_loss}, "
          f"layer_norm_eps={c.layer_norm_eps:g}; wrote {args.out}")


if __name__ == "__main__":
    cli()
