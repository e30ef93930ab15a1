"""Helpers of the training suites: the per-step losses of a run and a run stopped after its first epoch."""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType

import pytest


class Interrupted(Exception):
    pass


def step_losses(out: Path) -> list[float]:
    """The per-step losses of the run writing to `out` (its metrics.jsonl)."""
    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "step" in r]


def run_killed_after_first_epoch(cli: ModuleType, argv: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """`cli.cli(argv)`, killed right after epoch 1's checkpoint (as a crash would), the loop restored after."""
    real_loop = cli.train_epochs

    def killed_after_first_epoch(**kw):
        def on_epoch_end(epoch, loss, inner=kw["on_epoch_end"]):
            inner(epoch, loss)
            raise Interrupted
        return real_loop(**{**kw, "on_epoch_end": on_epoch_end})

    monkeypatch.setattr(cli, "train_epochs", killed_after_first_epoch)
    with pytest.raises(Interrupted):
        cli.cli(argv)
    monkeypatch.setattr(cli, "train_epochs", real_loop)
