"""`mae-embed` (service/bulk_embed.py) on Fashion-MNIST test-split PNGs: Parquet that pandas and pyarrow read with
the vectors `/embed` returns, through a server too, a resume after SIGKILL, bad files listed aside, OpenAI batch
files answered as `/v1/embeddings` answers."""

from __future__ import annotations

import base64
import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from PIL import Image
from service_helpers import ROOT, live_server, make_client

from service.app import create_app
from service.bulk_embed import Item, find_inputs, main
from service.settings import BUNDLED_MODEL_DIR, Settings

FASHION_MNIST_DIR = Path(os.environ.get("MAE_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
LABELS = ["T-shirt_top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle_boot"]
MODEL = json.loads((BUNDLED_MODEL_DIR / "model.json").read_text())


def read_idx(path: Path) -> np.ndarray:
    """An unsigned-byte IDX file, without torch (training.data's reader imports it; service tests stay torch-free)."""
    data = gzip.decompress(path.read_bytes())
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(data[3]))
    return np.frombuffer(data, np.uint8, offset=4 + 4 * len(shape)).reshape(shape)


def write_tree(root: Path, count: int) -> list[Item]:
    """The first `count` test-split images as PNGs in an ImageFolder tree root/<class>/<index>.png."""
    images_file, labels_file = FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz", FASHION_MNIST_DIR / "t10k-labels-idx1-ubyte.gz"
    if not images_file.is_file():
        pytest.skip(f"{images_file} missing: install Debian's dataset-fashion-mnist")
    images, labels = read_idx(images_file)[:count], read_idx(labels_file)[:count]
    items = []
    for index, (image, label) in enumerate(zip(images, labels, strict=True)):
        path = root / LABELS[label] / f"{index:05d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image, "L").save(path)
        items.append(Item(str(path), LABELS[label]))
    return sorted(items, key=lambda i: (i.label, i.path))


def mae_embed(*args: str, check: int | None = 0) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([sys.executable, "-m", "service.bulk_embed", "--quiet", *args], cwd=ROOT, text=True,
                          capture_output=True, timeout=240, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if check is not None:
        assert done.returncode == check, done.stdout + done.stderr
    return done


def embed_route(paths: list[str], **options: str) -> np.ndarray:
    """/embed's vectors of the files, 32 a request, from the bundled model served in process."""
    vectors = []
    with make_client(BUNDLED_MODEL_DIR) as client:
        for start in range(0, len(paths), 32):
            files = [("image", (Path(p).name, Path(p).read_bytes(), "image/png")) for p in paths[start:start + 32]]
            r = client.post("/embed", files=files, data=options)
            assert r.status_code == 200, r.text
            vectors += [item["embedding"] for item in r.json()["data"]]
    return np.asarray(vectors, np.float32)


def parquet_vectors(table: pa.Table) -> np.ndarray:
    return np.asarray(table.column("embedding").to_pylist(), np.float32)


def test_imagefolder_tree_to_parquet_equals_embed(tmp_path: Path) -> None:
    items = write_tree(tmp_path / "tree", 300)
    out = tmp_path / "fmnist.parquet"
    done = mae_embed(str(tmp_path / "tree"), "--out", str(out), "--rows-per-group", "120")
    assert "300 rows" in done.stdout and "0 bad files" in done.stdout

    table = pq.read_table(out)
    assert pq.ParquetFile(out).metadata.num_row_groups == 3  # 120 + 120 + 60, batches of 32
    assert str(table.schema.field("embedding").type) == "fixed_size_list<element: float>[256]"
    metadata = {k.decode(): v.decode() for k, v in table.schema.metadata.items()}
    assert (metadata["mae.model"], metadata["mae.model_version"]) == (MODEL["name"], MODEL["version"])
    assert metadata["mae.pooling"] == "cls+mean" and metadata["mae.normalize"] == "true"
    frame = pd.read_parquet(out)
    assert frame["path"].tolist() == [i.path for i in items]  # the tree's order: class folders, then files, sorted
    assert frame["label"].tolist() == [i.label for i in items]
    assert sorted(set(frame["label"])) == sorted(LABELS)
    expected = embed_route(frame["path"].tolist())
    np.testing.assert_allclose(np.stack(frame["embedding"].to_numpy()), expected, atol=1e-5, rtol=0)
    np.testing.assert_allclose(parquet_vectors(table), expected, atol=1e-5, rtol=0)
    assert not (tmp_path / "fmnist.parquet.parts").exists()
    assert (tmp_path / "fmnist.parquet.errors.jsonl").read_text() == ""
    again = mae_embed(str(tmp_path / "tree"), "--out", str(out), check=2)
    assert "--overwrite" in again.stderr


@pytest.mark.parametrize("flags, options", [
    (["--pooling", "mean", "--no-normalize"], {"pooling": "mean", "normalize": "false"}),
    (["--source", "classifier"], {"source": "classifier"}),
])
def test_options_as_embed_and_npy_output(tmp_path: Path, flags: list[str], options: dict[str, str]) -> None:
    items = write_tree(tmp_path / "tree", 40)
    out = tmp_path / "vectors.npy"
    assert main([str(tmp_path / "tree"), "--out", str(out), "--quiet", *flags]) == 0
    ids = [line.split("\t") for line in (tmp_path / "vectors.ids.tsv").read_text().splitlines()]
    assert ids == [[i.path, i.label] for i in items]
    np.testing.assert_allclose(np.load(out), embed_route([i.path for i in items], **options), atol=1e-5, rtol=0)


def test_url_through_a_server_equals_in_process(tmp_path: Path) -> None:
    items = write_tree(tmp_path / "tree", 100)
    (tmp_path / "tree" / "Bag" / "not-an-image.png").write_text("hello")  # its request is retried image by image
    local, remote = tmp_path / "local.parquet", tmp_path / "remote.parquet"
    mae_embed(str(tmp_path / "tree"), "--out", str(local), check=1)
    with live_server(create_app(Settings(model_dir=BUNDLED_MODEL_DIR))) as (url, _):
        mae_embed(str(tmp_path / "tree"), "--out", str(remote), "--url", url, "--rows-per-group", "30", check=1)
    a, b = pq.read_table(local), pq.read_table(remote)
    assert a.column("path").to_pylist() == b.column("path").to_pylist() == [i.path for i in items]
    assert b.schema.metadata[b"mae.model"].decode() == MODEL["name"]
    np.testing.assert_allclose(parquet_vectors(b), parquet_vectors(a), atol=1e-5, rtol=0)
    errors = [json.loads(line) for line in (tmp_path / "remote.parquet.errors.jsonl").read_text().splitlines()]
    assert [e["path"] for e in errors] == [str(tmp_path / "tree" / "Bag" / "not-an-image.png")]
    with make_client(BUNDLED_MODEL_DIR) as client:  # the reason is the server's, for that file alone
        alone = client.post("/embed", files={"image": ("image-0", b"hello", "application/octet-stream")})
    assert alone.status_code == 400 and errors[0]["reason"] == alone.json()["error"]["message"]


def test_resume_after_sigkill_has_every_row_once(tmp_path: Path) -> None:
    """Killed after some row groups were written, the run leaves only whole parts (read as a dataset) and no
    output; a rerun with other options is refused; the same command finishes the rest."""
    items = write_tree(tmp_path / "tree", 1000)
    out, parts = tmp_path / "fmnist.parquet", tmp_path / "fmnist.parquet.parts"
    command = [sys.executable, "-m", "service.bulk_embed", "--quiet", str(tmp_path / "tree"), "--out", str(out),
               "--rows-per-group", "50", "--batch-size", "16"]
    proc = subprocess.Popen(command, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while len(list(parts.glob("part-*.parquet"))) < 3:
        assert proc.poll() is None, "mae-embed ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    written = ds.dataset(parts, format="parquet").to_table()  # every part whole (temporaries start with a dot)
    assert 150 <= written.num_rows < 1000 and written.num_rows % 50 == 0

    refused = mae_embed(str(tmp_path / "tree"), "--out", str(out), "--pooling", "cls", check=2)
    assert "pooling" in refused.stderr
    done = mae_embed(*command[4:])
    assert f"1000 rows ({1000 - written.num_rows} embedded now" in done.stdout
    table = pq.read_table(out)
    paths = table.column("path").to_pylist()
    assert paths == [i.path for i in items]  # none missing, none twice, the inputs' order
    np.testing.assert_allclose(parquet_vectors(table), embed_route(paths), atol=1e-5, rtol=0)


def test_bad_files_are_listed_and_the_run_goes_on(tmp_path: Path) -> None:
    items = write_tree(tmp_path / "tree", 30)
    truncated = tmp_path / "tree" / "Coat" / "truncated.png"
    truncated.write_bytes(Path(items[0].path).read_bytes()[:60])
    text = tmp_path / "tree" / "Coat" / "text.png"
    text.write_text("not a picture\n")
    out = tmp_path / "out.parquet"
    done = mae_embed(str(tmp_path / "tree"), "--out", str(out), "--batch-size", "8", check=1)
    assert "30 rows" in done.stdout and "2 bad files" in done.stdout
    errors = {e["path"]: e["reason"] for e in map(json.loads, (tmp_path / "out.parquet.errors.jsonl").open())}
    assert set(errors) == {str(truncated), str(text)}
    assert "not a recognised image format" in errors[str(text)]
    assert "cannot decode image" in errors[str(truncated)]
    assert pd.read_parquet(out)["path"].tolist() == [i.path for i in items]


def test_inputs_folder_glob_and_list_file(tmp_path: Path) -> None:
    items = write_tree(tmp_path / "tree", 20)
    bag = sorted(i.path for i in items if i.label == "Bag")
    listed = tmp_path / "list.txt"
    listed.write_text(f"# a comment\n{items[1].path}\tshoe\n\n{Path(items[0].path).relative_to(tmp_path)}\n")
    assert find_inputs([str(tmp_path / "tree" / "Bag")]) == [Item(p) for p in bag]  # no class folders: unlabelled
    assert find_inputs([str(tmp_path / "tree" / "*" / "*.png")]) == [Item(p) for p in sorted(i.path for i in items)]
    assert find_inputs([str(listed), str(tmp_path / "tree")])[:3] == [
        Item(items[1].path, "shoe"), Item(str(tmp_path / Path(items[0].path).relative_to(tmp_path))), items[2]]
    assert main([str(tmp_path / "nowhere"), "--out", str(tmp_path / "x.parquet"), "--quiet"]) == 2


def vector(embedding: list[float] | str) -> np.ndarray:
    """An OpenAI-style embedding as floats (base64: little-endian float32)."""
    if isinstance(embedding, str):
        return np.frombuffer(base64.b64decode(embedding), "<f4")
    return np.asarray(embedding, np.float32)


def data_uri(path: str) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()


def test_openai_batch_file_answers_as_v1_embeddings(tmp_path: Path) -> None:
    """Every line answered as the server's /v1/embeddings answers its body (status, body; vectors to 1e-5), in
    order; a rerun after a kill mid-line continues after the last whole line."""
    items = write_tree(tmp_path / "tree", 6)
    bodies = [
        {"model": MODEL["name"], "input": [data_uri(i.path) for i in items[:4]]},
        {"model": MODEL["name"], "input": data_uri(items[4].path), "encoding_format": "base64"},
        {"model": "another-model", "input": data_uri(items[5].path)},
        {"model": MODEL["name"], "input": base64.b64encode(b"not an image").decode()},
        {"model": MODEL["name"], "input": [data_uri(items[5].path)], "source": "classifier"},
        {"model": MODEL["name"], "input": data_uri(items[5].path), "dimensions": 3},
    ]
    lines = [{"custom_id": f"request-{n}", "method": "POST", "url": "/v1/embeddings", "body": b}
             for n, b in enumerate(bodies)]
    lines.append({"custom_id": "url", "method": "POST", "url": "/v1/embeddings",  # a batch file fetches nothing
                  "body": {"model": MODEL["name"], "input": "http://127.0.0.1:9/image.png"}})
    lines.append({"custom_id": "chat", "method": "POST", "url": "/v1/chat/completions", "body": {}})
    source, out = tmp_path / "in.jsonl", tmp_path / "results.jsonl"
    source.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert main(["--openai-batch", str(source), "--out", str(out), "--quiet", "--batch-size", "4"]) == 0
    results = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["custom_id"] for r in results] == [line["custom_id"] for line in lines]

    with make_client(BUNDLED_MODEL_DIR) as client:
        for body, result in zip(bodies, results, strict=False):
            expected = client.post("/v1/embeddings", json=body)
            response = result["response"]
            assert response["status_code"] == expected.status_code, (body, response)
            assert response["request_id"].startswith("req_") and result["id"].startswith("batch_req_")
            if expected.status_code != 200:
                assert response["body"] == expected.json()
                assert result["error"] == {"code": expected.json()["error"]["type"],
                                           "message": expected.json()["error"]["message"]}
                continue
            assert result["error"] is None
            got, want = response["body"], expected.json()
            assert {k: v for k, v in got.items() if k != "data"} == {k: v for k, v in want.items() if k != "data"}
            for a, b in zip(got["data"], want["data"], strict=True):
                assert type(a["embedding"]) is type(b["embedding"])  # a list of floats, or a base64 string
                np.testing.assert_allclose(vector(a["embedding"]), vector(b["embedding"]), atol=1e-5, rtol=0)
    assert results[-2]["response"]["status_code"] == 422 and results[-2]["error"]["code"] == "invalid_option"
    assert results[-1]["response"]["status_code"] == 404

    whole = out.read_bytes().splitlines(keepends=True)
    out.write_bytes(b"".join(whole[:2]) + whole[2][:20])  # killed while writing the third line
    assert main(["--openai-batch", str(source), "--out", str(out), "--quiet"]) == 0
    again = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["custom_id"] for r in again] == [line["custom_id"] for line in lines]
    assert again[:2] == results[:2] and [r["response"]["status_code"] for r in again] == [
        r["response"]["status_code"] for r in results]
    assert out.read_text().endswith("\n")
