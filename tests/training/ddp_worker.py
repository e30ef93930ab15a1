"""Run under torchrun by test_pretrain: two pretraining steps with DDP (gloo), then dump each rank's parameters."""

import os
import sys
from pathlib import Path

import torch

from training import pretrain

out = Path(sys.argv[1])
captured = {}
real_loop = pretrain.train_epochs


def capture(**kw):
    captured["model"] = kw["model"].module
    captured["start"] = {k: v.clone() for k, v in kw["model"].module.state_dict().items()}
    return real_loop(**kw)


pretrain.train_epochs = capture
pretrain.cli(["--model", "mae_vit_test", "--limit", "32", "--batch-size", "8", "--epochs", "1",
              "--warmup-epochs", "0.1", "--blr", "1e-2", "--no-preview", "--quiet", "--output-dir", str(out / "out")])
rank = int(os.environ["RANK"])
torch.save(captured["model"].state_dict(), out / f"rank{rank}.pt")
torch.save(captured["start"], out / f"rank{rank}-start.pt")
