"""Training-step speed, side by side in one run (medians of interleaved repeats).

1. The MAE paper's Table 2 claim: an encoder on the visible 25% of patches vs the same encoder
   run on all patches with mask tokens ([M] in the encoder), for a ViT-L-shaped encoder.
2. Our pretraining step vs Hugging Face `ViTMAEForPreTraining` with the same configuration,
   batch, masking noise and threads.

    python benchmarks/train_speed.py [--arch large|base] [--batch 2] [--repeats 5] [--device cuda --amp bf16]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from model import MaskedAutoencoderViT, get_config


class MaskTokenEncoderMAE(MaskedAutoencoderViT):
    """Ablation: masked patches are replaced by a mask token and the encoder sees all L tokens."""

    def __init__(self, config):
        super().__init__(config)
        self.enc_mask_token = torch.nn.Parameter(torch.zeros(1, 1, config.embed_dim))

    def forward(self, imgs, mask_ratio=0.75, noise=None):
        ids_keep, ids_restore, mask = self.random_masking(imgs.shape[0], mask_ratio, noise, imgs.device)
        x = self.patch_embed(imgs)
        x = torch.where(mask.unsqueeze(-1).bool(), self.enc_mask_token.expand_as(x), x) + self.pos_embed[:, 1:, :]
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        for blk in self.blocks:
            x = blk(x)
        latent = self.norm(x)
        # The decoder sees every position already in order: identity restore over all L tokens.
        pred = self.forward_decoder(latent, torch.arange(mask.shape[1], device=imgs.device).expand_as(ids_restore))
        return self.forward_loss(imgs, pred, mask), pred, mask


def step_time(model, imgs, noise, opt, amp: str = "none") -> float:
    sync = torch.cuda.synchronize if imgs.is_cuda else (lambda: None)
    sync()
    t0 = time.perf_counter()
    with torch.autocast(imgs.device.type, dtype=torch.bfloat16) if amp == "bf16" else nullcontext():
        loss = model(imgs, mask_ratio=0.75, noise=noise)[0]
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    sync()
    return time.perf_counter() - t0


def hf_model(config):
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    hf = ViTMAEConfig(
        image_size=config.img_size, patch_size=config.patch_size, num_channels=config.in_chans,
        hidden_size=config.embed_dim, num_hidden_layers=config.depth, num_attention_heads=config.num_heads,
        intermediate_size=int(config.embed_dim * config.mlp_ratio), decoder_hidden_size=config.decoder_embed_dim,
        decoder_num_hidden_layers=config.decoder_depth, decoder_num_attention_heads=config.decoder_num_heads,
        decoder_intermediate_size=int(config.decoder_embed_dim * config.mlp_ratio), mask_ratio=0.75,
        norm_pix_loss=config.norm_pix_loss, layer_norm_eps=config.layer_norm_eps, qkv_bias=True,
    )
    model = ViTMAEForPreTraining(hf)

    class Adapter(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, imgs, mask_ratio=0.75, noise=None):
            out = self.inner(pixel_values=imgs, noise=noise)
            return out.loss, out.logits, out.mask

    return Adapter()


def compare(models: dict, imgs, noise, repeats: int, amp: str = "none") -> dict[str, float]:
    models = {k: m.to(imgs.device) for k, m in models.items()}
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-6) for k, m in models.items()}
    for k, m in models.items():
        m.train()
        for _ in range(1 if imgs.device.type == "cpu" else 3):  # warm-up (CUDA: kernels, allocator)
            step_time(m, imgs, noise, opts[k], amp)
    times: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(repeats):
        for k, m in models.items():  # interleaved, so drifts in machine load hit both alike
            times[k].append(step_time(m, imgs, noise, opts[k], amp))
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--arch", default="large", choices=["base", "large"])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--hf-arch", default="mae_vit_tiny_fmnist")
    p.add_argument("--hf-batch", type=int, default=256)
    p.add_argument("--only", choices=["table2", "huggingface"], default=None, help="run one comparison")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--amp", default="none", choices=["none", "bf16"], help="autocast for the steps")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/train_speed.json"))
    args = p.parse_args()
    torch.manual_seed(0)
    results = {"threads": torch.get_num_threads(), "device": args.device, "amp": args.amp,
               "device_name": torch.cuda.get_device_name() if args.device == "cuda" else "cpu"}

    if args.only != "huggingface":
        table2(args, results)
    if args.only != "table2":
        versus_huggingface(args, results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))


def table2(args: argparse.Namespace, results: dict) -> None:
    config = get_config(f"mae_vit_{args.arch}_patch16")
    visible, mask_tokens = MaskedAutoencoderViT(config), MaskTokenEncoderMAE(config)
    mask_tokens.load_state_dict(visible.state_dict(), strict=False)
    imgs = torch.randn(args.batch, 3, config.img_size, config.img_size, device=args.device)
    noise = torch.rand(args.batch, config.num_patches, device=args.device)
    t = compare({"visible_only": visible, "mask_tokens_in_encoder": mask_tokens}, imgs, noise, args.repeats, args.amp)
    results["paper_table2"] = {"arch": f"vit_{args.arch}_patch16", "batch": args.batch, "step_seconds": t,
                               "speedup": t["mask_tokens_in_encoder"] / t["visible_only"]}
    print(f"ViT-{args.arch[0].upper()} step (batch {args.batch}): visible-only {t['visible_only']:.2f} s, "
          f"mask tokens in encoder {t['mask_tokens_in_encoder']:.2f} s -> {results['paper_table2']['speedup']:.2f}x")


def versus_huggingface(args: argparse.Namespace, results: dict) -> None:
    config = get_config(args.hf_arch, layer_norm_eps=1e-12)
    ours, theirs = MaskedAutoencoderViT(config), hf_model(config)
    imgs = torch.randn(args.hf_batch, config.in_chans, config.img_size, config.img_size, device=args.device)
    noise = torch.rand(args.hf_batch, config.num_patches, device=args.device)
    t = compare({"ours": ours, "huggingface": theirs}, imgs, noise, args.repeats, args.amp)
    results["vs_huggingface"] = {"arch": args.hf_arch, "batch": args.hf_batch, "step_seconds": t,
                                 "ours_over_theirs": t["ours"] / t["huggingface"]}
    print(f"{args.hf_arch} step (batch {args.hf_batch}): ours {t['ours'] * 1e3:.0f} ms, "
          f"HF {t['huggingface'] * 1e3:.0f} ms -> ours/theirs {results['vs_huggingface']['ours_over_theirs']:.2f}x")


if __name__ == "__main__":
    main()
