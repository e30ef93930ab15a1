"""mae-export and the model-directory loader: ORT parity with torch, the loader's refusals, atomic failure."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image

from model import Checkpoint, MaskedAutoencoderViT, load_checkpoint, load_classifier
from model_dir import self_check
from model_dir.schema import MODEL_JSON, ModelDirError, check_session_io, load_model_dir, sha256_file
from training import export, graphs, variants, verification
from training.export import derive_variants, export_model_dir
from training.verification import ExportVerificationError

FIXTURE_IMAGES = sorted((Path(__file__).parents[1] / "fixtures" / "fmnist").glob("test_*.png"))[:8]
L = 49  # patches of mae_vit_test (28 / 4 squared)


def session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def real_pixels(model_dir: Path) -> torch.Tensor:
    """The fixture PNGs normalized with the preprocessing the model directory declares."""
    pre = json.loads((model_dir / MODEL_JSON).read_text())["preprocessing"]
    x = np.stack([np.asarray(Image.open(p).convert("L"), dtype=np.float32) / 255.0 for p in FIXTURE_IMAGES])
    return torch.from_numpy((x[:, None] - pre["mean"][0]) / pre["std"][0])


def random_ids(batch: int, keep: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    noise = torch.rand(batch, L, generator=torch.Generator().manual_seed(seed))
    ids_shuffle = torch.argsort(noise, dim=1)
    return ids_shuffle[:, :keep], torch.argsort(ids_shuffle, dim=1)


@pytest.fixture(scope="module")
def mae(tiny_checkpoint: Path) -> MaskedAutoencoderViT:
    return load_checkpoint(tiny_checkpoint)


@pytest.fixture(scope="module")
def encoder(tiny_model_dir: Path) -> ort.InferenceSession:
    return session(tiny_model_dir / "encoder.onnx")


@pytest.fixture()
def model_dir_copy(tiny_model_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_model_dir, tmp_path / "copy"))


@pytest.mark.parametrize("batch", [1, 3, 8])
@pytest.mark.parametrize("keep", [1, L // 4, L])
@torch.no_grad()
def test_encoder_matches_torch(mae, encoder, batch: int, keep: int) -> None:
    pixels = torch.randn(batch, 1, 28, 28, generator=torch.Generator().manual_seed(batch))
    ids_keep, _ = random_ids(batch, keep, seed=keep)
    latent = encoder.run(None, {"pixels": pixels.numpy(), "ids_keep": ids_keep.numpy()})[0]
    assert latent.shape == (batch, 1 + keep, 32)
    np.testing.assert_allclose(latent, mae.forward_encoder(pixels, ids_keep).numpy(), rtol=0, atol=1e-4)


@torch.no_grad()
def test_full_keep_is_the_unmasked_encoder(mae, encoder, tiny_model_dir) -> None:
    pixels = real_pixels(tiny_model_dir)
    ids_keep = np.tile(np.arange(L), (len(pixels), 1))
    latent = encoder.run(None, {"pixels": pixels.numpy(), "ids_keep": ids_keep})[0]
    np.testing.assert_allclose(latent[:, 0], mae.forward_features(pixels, "cls").numpy(), rtol=0, atol=1e-4)
    np.testing.assert_allclose(latent[:, 1:].mean(1), mae.forward_features(pixels, "mean").numpy(), rtol=0, atol=1e-4)


@pytest.mark.parametrize("batch", [1, 3, 8])
@torch.no_grad()
def test_encoder_decoder_match_torch_forward(mae, encoder, tiny_model_dir, batch: int) -> None:
    pixels = real_pixels(tiny_model_dir)[:batch]
    noise = torch.rand(batch, L, generator=torch.Generator().manual_seed(7))
    _, pred, _ = mae(pixels, mask_ratio=0.75, noise=noise)
    ids_keep, ids_restore, _ = mae.random_masking(batch, 0.75, noise)
    latent = encoder.run(None, {"pixels": pixels.numpy(), "ids_keep": ids_keep.numpy()})[0]
    ort_pred = session(tiny_model_dir / "decoder.onnx").run(None, {"latent": latent,
                                                                   "ids_restore": ids_restore.numpy()})[0]
    np.testing.assert_allclose(ort_pred, pred.numpy(), rtol=0, atol=1e-4)


@torch.no_grad()
def test_classifier_matches_torch_and_carries_labels(tiny_checkpoint, tiny_model_dir) -> None:
    classifier = load_classifier(tiny_checkpoint)
    pixels = real_pixels(tiny_model_dir)
    logits = session(tiny_model_dir / "classifier.onnx").run(None, {"pixels": pixels.numpy()})[0]
    np.testing.assert_allclose(logits, classifier(pixels).numpy(), rtol=0, atol=1e-4)
    spec = load_model_dir(tiny_model_dir).spec
    assert spec.labels == classifier.labels and len(spec.labels) == 10
    assert (spec.classifier.source, spec.classifier.pooling, spec.classifier.top1) == ("probe", "mean", 11.5)
    assert spec.embedding.default_pooling == "mean"
    assert (spec.training.dataset, spec.training.epochs) == ("fashion-mnist", 2)


@torch.no_grad()
def test_classifier_graph_outputs_its_features_in_every_precision(tiny_checkpoint, tiny_model_dir) -> None:
    """`features`, the input of the head's last Linear (here the probe's batch-normalized pooled features): in the
    fp32, fp16 and int8 graphs, declared in model.json and verified against torch like the logits."""
    classifier = load_classifier(tiny_checkpoint)
    pixels = real_pixels(tiny_model_dir)
    expected = classifier.head_features(pixels).numpy()
    model_dir = load_model_dir(tiny_model_dir)
    assert model_dir.spec.classifier.features and model_dir.spec.classifier_features_dim() == 32
    for precision in ("fp32", "fp16", "int8"):
        assert [t.name for t in model_dir.file("classifier", precision).outputs] == ["logits", "features"]
        logits, features = session(model_dir.path("classifier", precision)).run(None, {"pixels": pixels.numpy()})
        assert features.shape == expected.shape and features.dtype == np.float32
        if precision == "fp32":
            np.testing.assert_allclose(features, expected, rtol=0, atol=1e-4)
        assert self_check.cosine_per_image(expected, features).min() >= 0.999
    rows = [r for r in model_dir.spec.verification.rows if r.graph == "classifier.features"]
    assert {(r.precision, r.inputs) for r in rows} == {(p, i) for p in ("fp32", "fp16", "int8")
                                                       for i in ("random", "real")}
    assert all(r.passed for r in rows)


def test_reexport_adds_the_features_output_to_an_older_directory(logits_only_dir, tiny_model_dir, tmp_path) -> None:
    """mae-export --from-model-dir --reexport: a directory whose classifier has logits only (as before the features
    output) gets it, from weights recovered from its fp32 graphs; the same logits and latent, the same facts."""
    old = logits_only_dir
    before_spec = load_model_dir(old).spec
    assert not before_spec.classifier.features
    export.cli(["--from-model-dir", str(old), "--reexport", "--out", str(tmp_path / "new")])
    out = tmp_path / "new"
    new = load_model_dir(out).spec
    assert new.classifier.features and new.weights is None and new.self_check.reference == "torch"
    assert list(new.files["classifier"]) == ["fp32"]
    assert new.version == load_model_dir(tiny_model_dir).spec.version != before_spec.version  # the same graphs
    assert (new.name, new.labels, new.training, new.preprocessing, new.embedding) == (
        before_spec.name, before_spec.labels, before_spec.training, before_spec.preprocessing, before_spec.embedding)
    assert {r.graph for r in new.verification.rows} >= {"classifier", "classifier.features"}
    pixels = real_pixels(tiny_model_dir).numpy()
    before = session(old / "classifier.onnx").run(None, {"pixels": pixels})
    after = session(out / "classifier.onnx").run(None, {"pixels": pixels})
    assert len(before) == 1 and len(after) == 2
    np.testing.assert_allclose(after[0], before[0], rtol=0, atol=1e-5)
    ids = np.tile(np.arange(L, dtype=np.int64), (len(pixels), 1))
    np.testing.assert_allclose(session(out / "encoder.onnx").run(None, {"pixels": pixels, "ids_keep": ids})[0],
                               session(old / "encoder.onnx").run(None, {"pixels": pixels, "ids_keep": ids})[0],
                               rtol=0, atol=1e-5)


@pytest.mark.parametrize("precision", ["fp16", "int8"])
@torch.no_grad()
def test_reduced_precision_variants_load_and_keep_the_latent(mae, tiny_model_dir, precision: str) -> None:
    model_dir = load_model_dir(tiny_model_dir)
    assert model_dir.precisions("encoder") == ["fp32", "fp16", "int8"]
    for graph in ("encoder", "decoder", "classifier"):
        check_session_io(model_dir.file(graph, precision), session(model_dir.path(graph, precision)))
    pixels = real_pixels(tiny_model_dir)
    ids_keep, _ = random_ids(len(pixels), L // 4, seed=3)
    latent = session(model_dir.path("encoder", precision)).run(
        None, {"pixels": pixels.numpy(), "ids_keep": ids_keep.numpy()})[0]
    assert latent.dtype == np.float32  # keep_io_types: the server feeds and reads float32
    cosine = self_check.cosine_per_image(mae.forward_encoder(pixels, ids_keep).numpy(), latent).min()
    assert cosine >= self_check.MIN_COSINE[precision]


def test_verification_table_is_stored(tiny_model_dir) -> None:
    rows = load_model_dir(tiny_model_dir).spec.verification.rows
    seen = {(r.graph, r.precision, r.inputs) for r in rows}
    for graph in ("encoder", "encoder+decoder", "classifier"):
        for precision in ("fp32", "fp16", "int8"):
            assert (graph, precision, "random") in seen and (graph, precision, "real") in seen
    assert {r.batch for r in rows} == {1, 3, 8} and {r.keep for r in rows} == {None, 1, L // 4, L}
    assert all(r.max_abs_diff <= 1e-4 for r in rows if r.precision == "fp32")


def test_loader_refuses_a_corrupted_file(model_dir_copy) -> None:
    data = bytearray((model_dir_copy / "encoder.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (model_dir_copy / "encoder.onnx").write_bytes(bytes(data))
    with pytest.raises(ModelDirError, match=r"encoder\.onnx: sha256 .* differs"):
        load_model_dir(model_dir_copy)


def test_loader_refuses_a_missing_file(model_dir_copy) -> None:
    (model_dir_copy / "decoder.int8.onnx").unlink()
    with pytest.raises(ModelDirError, match=r"decoder\.int8\.onnx: missing"):
        load_model_dir(model_dir_copy)


def test_loader_refuses_a_swapped_file(model_dir_copy) -> None:
    shutil.copyfile(model_dir_copy / "decoder.onnx", model_dir_copy / "encoder.onnx")
    with pytest.raises(ModelDirError, match=r"encoder\.onnx: size .* replaced"):
        load_model_dir(model_dir_copy)


def _rewrite(model_dir: Path, edit) -> None:
    path = model_dir / MODEL_JSON
    raw = json.loads(path.read_text())
    edit(raw)
    path.write_text(json.dumps(raw))


def test_a_swapped_file_with_its_hash_updated_fails_the_io_check(model_dir_copy) -> None:
    shutil.copyfile(model_dir_copy / "decoder.onnx", model_dir_copy / "encoder.onnx")

    def rehash(raw):
        raw["files"]["encoder"]["fp32"].update(sha256=sha256_file(model_dir_copy / "encoder.onnx"),
                                               bytes=(model_dir_copy / "encoder.onnx").stat().st_size)
    _rewrite(model_dir_copy, rehash)
    model_dir = load_model_dir(model_dir_copy)  # the hashes agree now: only the graph's I/O can tell
    with pytest.raises(ModelDirError, match=r"encoder\.onnx: graph inputs are \['latent', 'ids_restore'\]"):
        check_session_io(model_dir.file("encoder"), session(model_dir.path("encoder")))


@pytest.mark.parametrize(("tensor", "field", "value", "problem"), [
    (0, "dtype", "int32", r"input 'pixels' has dtype float32, model\.json declares int32"),
    (1, "shape", ["B", 12], r"input 'ids_keep' axis 1 is K in the graph, model\.json declares 12"),
    (0, "shape", ["B", 3, 28, 28], r"input 'pixels' axis 1 is 1 in the graph, model\.json declares 3"),
    (1, "shape", ["B"], r"input 'ids_keep' has rank 2"),
    (1, "name", "ids_shuffle", r"graph inputs are \['pixels', 'ids_keep'\], model\.json declares"),
])
def test_a_model_json_that_lies_about_inputs_fails_the_io_check(model_dir_copy, tensor, field, value,
                                                               problem) -> None:
    _rewrite(model_dir_copy, lambda raw: raw["files"]["encoder"]["int8"]["inputs"][tensor].update({field: value}))
    model_dir = load_model_dir(model_dir_copy)
    with pytest.raises(ModelDirError, match=r"encoder\.int8\.onnx: .*" + problem):
        check_session_io(model_dir.file("encoder", "int8"), session(model_dir.path("encoder", "int8")))


@pytest.mark.parametrize(("content", "problem"), [
    ("{not json", r"not valid JSON"),
    ('{"schema_version": 2}', r"schema_version 2 is not supported"),
    (None, r"invalid model\.json: files\.encoder\.fp32\.path: .*relative"),
    ("", r"invalid model\.json: .*classifier must be given together"),
])
def test_loader_refuses_an_invalid_model_json(model_dir_copy, content, problem) -> None:
    if content is None:
        _rewrite(model_dir_copy, lambda raw: raw["files"]["encoder"]["fp32"].update(path="../encoder.onnx"))
    elif content == "":
        _rewrite(model_dir_copy, lambda raw: raw.update(classifier=None))
    else:
        (model_dir_copy / MODEL_JSON).write_text(content)
    with pytest.raises(ModelDirError, match=problem):
        load_model_dir(model_dir_copy)


def test_an_older_model_json_naming_the_interpolation_still_loads(model_dir_copy) -> None:
    assert "interpolation" not in json.loads((model_dir_copy / MODEL_JSON).read_text())["preprocessing"]
    _rewrite(model_dir_copy, lambda raw: raw["preprocessing"].update(interpolation="bicubic"))
    assert load_model_dir(model_dir_copy).spec.preprocessing.resize == 28
    _rewrite(model_dir_copy, lambda raw: raw["preprocessing"].update(interpolation="bilinear"))
    with pytest.raises(ModelDirError, match=r"preprocessing\.interpolation: Extra inputs"):
        load_model_dir(model_dir_copy)


@pytest.fixture()
def encoder_only_checkpoint(tiny_checkpoint: Path, tmp_path: Path) -> Path:
    """The tiny MAE without its decoder and head, and without training data facts (as an imported file)."""
    ckpt = Checkpoint.load(tiny_checkpoint)
    path = tmp_path / "encoder.pth"
    Checkpoint(model=ckpt.encoder_state_dict(), config=ckpt.config, kind="encoder").save(path)
    return path


def test_external_data_export_loads(encoder_only_checkpoint, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(graphs, "EXTERNAL_DATA_BYTES", 0)  # as for a ViT-H over protobuf's 2 GiB
    monkeypatch.setattr(variants, "EXTERNAL_DATA_BYTES", 0)
    monkeypatch.setattr(verification, "VERIFY_BATCHES", (2,))
    out = export_model_dir(encoder_only_checkpoint, tmp_path / "out", log=lambda _: None)
    model_dir = load_model_dir(out)
    assert not model_dir.has("decoder") and not model_dir.has("classifier") and model_dir.spec.labels is None
    assert model_dir.spec.preprocessing.mean == [0.5] and model_dir.spec.embedding.default_pooling == "cls"
    externals = model_dir.file("encoder").external_data
    assert [e.path for e in externals] == ["encoder.onnx.data"]
    (out / "encoder.onnx.data").write_bytes(b"\0" + (out / "encoder.onnx.data").read_bytes()[1:])
    with pytest.raises(ModelDirError, match=r"encoder\.onnx\.data: sha256 .*\(external data of encoder\.onnx\)"):
        load_model_dir(out)


def test_failed_verification_leaves_no_directory(encoder_only_checkpoint, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(self_check, "FP32_MAX_ABS_DIFF", 0.0)  # ORT is never bit-exact with torch
    monkeypatch.setattr(verification, "VERIFY_BATCHES", (2,))
    with pytest.raises(ExportVerificationError, match=r"verification cases failed"):
        export_model_dir(encoder_only_checkpoint, tmp_path / "out", log=lambda _: None)
    assert list(tmp_path.iterdir()) == [encoder_only_checkpoint]


def test_a_failed_export_keeps_the_previous_model_directory(encoder_only_checkpoint, model_dir_copy, tmp_path,
                                                             monkeypatch) -> None:
    before = sha256_file(model_dir_copy / MODEL_JSON)
    monkeypatch.setattr(self_check, "FP32_MAX_ABS_DIFF", 0.0)
    monkeypatch.setattr(verification, "VERIFY_BATCHES", (2,))
    with pytest.raises(ExportVerificationError):
        export_model_dir(encoder_only_checkpoint, model_dir_copy, log=lambda _: None)
    assert sha256_file(model_dir_copy / MODEL_JSON) == before
    assert load_model_dir(model_dir_copy).has("decoder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy", "encoder.pth"]


@pytest.mark.parametrize("argv", [
    ["--checkpoint", "no-such.pth"],
    ["--precision", "fp32,int4"],
    ["--opset", "23"],
    ["--reexport"],  # needs --from-model-dir
])
def test_cli_exits_2_on_bad_input(tiny_checkpoint, tmp_path, capsys, argv) -> None:
    args = ["--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path / "out"), *argv]
    with pytest.raises(SystemExit) as exc:
        export.cli(args)
    assert exc.value.code == 2
    assert "mae-export: error:" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_variants_derived_from_a_model_directory(tiny_model_dir, tmp_path) -> None:
    """mae-export --from-model-dir: int8 added without the checkpoint, the fp32 graphs as the reference."""
    out = derive_variants(tiny_model_dir, tmp_path / "derived", ["int8"], real_pixels(tiny_model_dir).numpy(),
                          log=lambda _: None)
    spec = load_model_dir(out).spec
    assert spec.self_check.reference == "onnxruntime-fp32" and spec.self_check.inputs == "real"
    assert all(spec.files[g]["int8"].quantization == "dynamic-s8-reduce-range-float-block0" for g in spec.files)
    rows = spec.verification.rows
    assert {r.precision for r in rows} == {"fp32", "fp16", "int8"} and all(r.passed for r in rows)
    before = load_model_dir(tiny_model_dir).spec.verification.rows
    assert [r for r in rows if r.precision == "fp32"] == [r for r in before if r.precision == "fp32"]  # torch's


def test_no_weights_leaves_out_the_weights_file_only(encoder_only_checkpoint, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(verification, "VERIFY_BATCHES", (2,))
    with_weights = load_model_dir(export_model_dir(encoder_only_checkpoint, tmp_path / "a", log=lambda _: None))
    without = load_model_dir(export_model_dir(encoder_only_checkpoint, tmp_path / "b", log=lambda _: None,
                                              weights=False))
    assert with_weights.spec.weights is not None and (tmp_path / "a" / with_weights.spec.weights.path).is_file()
    assert without.spec.weights is None and not list((tmp_path / "b").glob("*.safetensors"))
    assert without.spec.version == with_weights.spec.version  # the same graphs
