"""The GPU check (benchmarks/gpu.sh) fits its command limit and keeps going past a failed row: its steps' limits
add up to at most 540 s, a row that fails (an engine error, a failed ViT-B export) is recorded and the next row
runs, and (slow) the whole script runs end to end on this CPU in smoke mode."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import engines_raw
from benchmarks.engines_raw import Budget, ModelSource, Row, run_rows

ROOT = Path(__file__).resolve().parents[1]
GPU_SH = ROOT / "benchmarks" / "gpu.sh"


def test_the_steps_limits_fit_540_s():
    limits = {m.group(1): int(m.group(2)) for m in re.finditer(r"^step (\w+) (\d+) ", GPU_SH.read_text(), re.M)}
    assert set(limits) == {"providers", "raw", "serve"}
    assert sum(limits.values()) <= 540, limits


def test_a_failing_row_does_not_stop_the_next(tmp_path):
    """An invalid precision fails its row; the configuration after it is measured."""
    out = tmp_path / "raw.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "engines_raw.py"), "--device", "cpu", "--models",
                           "default", "--smoke", "--batches", "1", "--configs", "onnxruntime:fp99,onnxruntime:fp32",
                           "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    failed, ran = report["results"]
    assert failed["precision"] == "fp99" and "fp99" in failed["error"]
    assert ran["precision"] == "fp32" and ran["img_per_s"] > 0 and "error" not in ran
    assert report["complete"]


def test_a_failed_export_fails_its_model_rows_once_and_the_file_is_written_after_every_row(tmp_path, monkeypatch):
    exports = []

    def failing_export(config_name, precisions, budget):
        exports.append(config_name)
        raise RuntimeError("no onnxscript")

    monkeypatch.setattr(engines_raw, "export_random", failing_export)
    out = tmp_path / "rows.json"
    vitb, bundled = ModelSource("vitb"), ModelSource("default")
    budget = Budget(None)

    def bundled_row() -> dict:
        written = json.loads(out.read_text())  # the two ViT-B rows are on disk before this row runs
        assert [r["row"] for r in written["results"]] == ["vitb a", "vitb b"] and not written["complete"]
        return {"model_dir": str(bundled.path(budget))}

    rows = [Row("vitb a", {}, 1.0, lambda: {"dir": str(vitb.path(budget))}),
            Row("vitb b", {}, 1.0, lambda: {"dir": str(vitb.path(budget))}),
            Row("bundled", {}, 1.0, bundled_row),
            Row("too long", {}, 1e9, lambda: {})]
    results = run_rows(rows, {}, out, budget=Budget(3600), log=lambda message: None)
    assert exports == ["mae_vit_base_patch16"]  # tried once, remembered for the second row
    assert all("no onnxscript" in r["error"] for r in results[:2])
    assert results[2]["model_dir"] == str(engines_raw.BUNDLED) and "error" not in results[2]
    assert results[3]["skipped"].startswith("budget")
    assert json.loads(out.read_text()) == {"complete": True, "results": results}
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.slow
@pytest.mark.timeout(600)  # gpu.sh stops itself by 540 s
def test_gpu_sh_smoke_runs_end_to_end_on_the_cpu(tmp_path):
    done = subprocess.run(["bash", str(GPU_SH), "--device", "cpu", "--smoke"], capture_output=True, text=True,
                          env={**os.environ, "MAE_GPU_RESULTS": str(tmp_path)}, timeout=590)
    assert done.returncode == 0, done.stdout[-3000:]
    for step in ("providers", "raw", "serve"):
        report = json.loads((tmp_path / f"{step}.json").read_text())
        assert report["complete"], step
        results = report["results"]
        assert results, step
        assert not [r for r in results if "error" in r or "skipped" in r], (step, results)
        if step != "providers":
            assert {r["model"] for r in results} == {"bundled"}
    providers = json.loads((tmp_path / "providers.json").read_text())["results"]
    assert {r["engine"] for r in providers} == {"onnxruntime", "torch"}
    assert not [r for r in providers if r["engine"] == "onnxruntime" and r["torch_loaded"]]
    assert all(r["device_reason"] == "MAE_DEVICE=cpu" for r in providers if r["engine"] == "onnxruntime")
    serve = json.loads((tmp_path / "serve.json").read_text())["results"]
    assert all(run["errors"] == 0 and run["img_per_s"] > 0 for r in serve for run in r["runs"])
    # on the CPU the whole latent comes back: [B, 1 + K, D] float32 per image, K the patches kept at 75 % masking
    onnx_runs = [run for r in serve if r["engine"] == "onnxruntime" for run in r["runs"]]
    assert onnx_runs and all(run["output_bytes_per_image"] > 0 for run in onnx_runs)
    log = (tmp_path / "gpu.log").read_text()
    summary = log.split("== summary", 1)[1]
    assert "providers.json: 4 ran, 0 failed, 0 skipped" in summary
    assert re.search(r"raw\.json: \d+ ran, 0 failed, 0 skipped", summary)
    assert re.search(r"serve\.json: \d+ ran, 0 failed, 0 skipped", summary)
    assert "== done in" in log
