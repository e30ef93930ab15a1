"""Image URLs (MAE_URL_ALLOWLIST): fetched from a real HTTP server on loopback, in every protocol that carries text
and by /search, and refused when the host or any address it resolves to is not allowed, on a redirect to such a host, when the
origin is too slow or its body too large or not an image; the server goes on serving after each."""

from __future__ import annotations

import ipaddress
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from service_helpers import SAMPLES, make_client, metric, sample_png, server_process
from test_intake import B64, embed, error_of, vectors

from service.fetch import Allowlist
from service.settings import Settings

PNG = sample_png()
MAX_BYTES = 64 * 1024
TIMEOUT_S = 1.0


class Origin(BaseHTTPRequestHandler):
    """The image host the tests fetch from: one path per behaviour."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:
        pass

    def _send(self, status: int, body: bytes, content_type: str = "image/png", **headers: str) -> None:
        self.send_response(status)
        for name, value in {"Content-Type": content_type, "Content-Length": str(len(body)), **headers}.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        path, _, query = self.path.partition("?")
        try:
            if path == "/sneaker.png":
                self._send(200, PNG)
            elif path == "/octet-stream":
                self._send(200, PNG, "application/octet-stream")
            elif path == "/redirect":  # ?to=<location>
                self._send(302, b"", "text/plain", Location=query.removeprefix("to="))
            elif path == "/loop":
                self._send(302, b"", "text/plain", Location="/loop")
            elif path == "/slow":  # the whole file, a byte every 50 ms: 50 s for the sample
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(PNG)))
                self.end_headers()
                for byte in PNG:
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
                    time.sleep(0.05)
            elif path == "/announced-large":  # a Content-Length over the limit, the body never sent
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(MAX_BYTES + 1))
                self.end_headers()
                self.wfile.flush()
                time.sleep(2)
            elif path == "/chunked-large":  # no length: chunks past the limit
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                chunk = PNG * (8192 // len(PNG) + 1)
                for _ in range(4 * MAX_BYTES // len(chunk)):
                    self.wfile.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
                self.wfile.write(b"0\r\n\r\n")
            elif path == "/page.html":
                self._send(200, b"<html>not an image</html>", "text/html; charset=utf-8")
            elif path == "/not-an-image.png":
                self._send(200, b"not an image at all", "image/png")
            else:
                self._send(404, b"not found", "text/plain")
        except OSError:  # the fetcher hung up (a refusal or a timeout): what these paths are for
            self.close_connection = True


@pytest.fixture(scope="module")
def origin() -> Iterator[str]:
    """The origin on 127.0.0.1 (a thread per connection); its base URL."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Origin)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture(scope="module")
def live(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The server as a process on a real socket, fetching from loopback (127.0.0.1 listed explicitly), with the
    bundled samples as its /search gallery."""
    gallery = tmp_path_factory.mktemp("gallery")
    for sample in SAMPLES.glob("*.png"):
        (gallery / sample.name).write_bytes(sample.read_bytes())
    env = {"MAE_URL_ALLOWLIST": "127.0.0.1, images.example.com", "MAE_URL_TIMEOUT_S": str(TIMEOUT_S),
           "MAE_URL_MAX_BYTES": str(MAX_BYTES), "MAE_URL_MAX_REDIRECTS": "2", "MAE_GALLERY": str(gallery)}
    with server_process(tiny_model_dir, env=env) as (url, _):
        yield url


@pytest.fixture(scope="module")
def reference(live: str) -> np.ndarray:
    """The sample's embedding, uploaded as a file."""
    return vectors(embed(live, "native-file", [PNG]), "native-file")[0]


def refused(live: str, url: str, status: int, kind: str, words: str, protocol: str = "native-json") -> None:
    """`url` gets `status`, error `kind` (where the protocol has types) and `words`; the server still serves."""
    response = embed(live, protocol, [url])
    got_status, got = error_of(response, protocol)
    assert got_status == status and words in response.text, (url, response.text)
    assert protocol.startswith("oip") or got == kind, (url, response.text)
    assert embed(live, protocol, [B64]).status_code == 200


@pytest.mark.parametrize("protocol", ["native-json", "native-form", "openai", "oip-json", "oip-binary"])
def test_a_url_is_the_same_embedding_as_the_upload(live: str, origin: str, reference: np.ndarray,
                                                   protocol: str) -> None:
    """A URL (also after an allowed redirect, and served as application/octet-stream) beside an inline image."""
    images = [f"{origin}/sneaker.png", B64, f"{origin}/redirect?to=/sneaker.png", f"{origin}/octet-stream"]
    got = vectors(embed(live, protocol, images), protocol)
    np.testing.assert_allclose(got, np.stack([reference] * len(images)), atol=1e-5, rtol=0)


def test_search_takes_a_url(live: str, origin: str) -> None:
    by_url = httpx.post(f"{live}/search", json={"image": f"{origin}/sneaker.png", "k": 3}, timeout=30)
    uploaded = httpx.post(f"{live}/search", json={"image": B64, "k": 3}, timeout=30)
    assert by_url.status_code == uploaded.status_code == 200, by_url.text
    assert by_url.json()["data"] == uploaded.json()["data"] and "sneaker" in by_url.text


def test_hosts_not_listed_are_refused_before_any_connection(live: str, origin: str) -> None:
    port = origin.rsplit(":", 1)[1]
    for url in (f"http://127.0.0.2:{port}/sneaker.png", f"http://localhost:{port}/sneaker.png",
                "https://example.com/cat.png", f"HTTP://images.example.com.evil.test:{port}/sneaker.png"):
        refused(live, url, 422, "invalid_option", "is not allowed (MAE_URL_ALLOWLIST)")
    refused(live, "http:///sneaker.png", 422, "invalid_option", "not a valid http(s) URL with a host")
    refused(live, f"http://user:secret@127.0.0.1:{port}/sneaker.png", 422, "invalid_option", "credentials")
    refused(live, f"http://127.0.0.2:{port}/x.png", 422, "invalid_option", "MAE_URL_ALLOWLIST", "oip-json")


def test_a_listed_name_that_resolves_to_a_private_address_is_refused(tiny_model_dir: Path, origin: str,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """images.example.com is listed by name; resolved to loopback (in-process, getaddrinfo patched) it is refused
    after the resolution; with the address listed too it is fetched from there."""
    port = int(origin.rsplit(":", 1)[1])
    real = socket.getaddrinfo

    def resolve(host: str, *args: Any, **kwargs: Any) -> Any:
        return real("127.0.0.1" if host == "images.example.com" else host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    url = f"http://images.example.com:{port}/sneaker.png"
    with make_client(tiny_model_dir, url_allowlist="images.example.com") as client:
        response = client.post("/embed", json={"image": url})
        assert response.status_code == 422, response.text
        assert "resolves to 127.0.0.1, not a public address" in response.json()["error"]["message"]
        assert client.post("/embed", json={"image": B64}).status_code == 200
    with make_client(tiny_model_dir, url_allowlist="images.example.com,127.0.0.0/8") as client:
        assert client.post("/embed", json={"image": url}).status_code == 200


def test_a_real_name_that_resolves_to_loopback_is_refused(tiny_model_dir: Path, origin: str) -> None:
    """`localhost` listed by name is resolved for real: its loopback addresses are refused; `*` does not allow
    them either (a decimal spelling of 127.0.0.1 included)."""
    port = origin.rsplit(":", 1)[1]
    with make_client(tiny_model_dir, url_allowlist="localhost") as client:
        response = client.post("/embed", json={"image": f"http://localhost:{port}/sneaker.png"})
        assert response.status_code == 422 and "not a public address" in response.text, response.text
    with make_client(tiny_model_dir, url_allowlist="*") as client:
        for host in ("localhost", "127.0.0.1", "2130706433"):
            response = client.post("/embed", json={"image": f"http://{host}:{port}/sneaker.png"})
            assert response.status_code == 422 and "not a public address" in response.text, (host, response.text)


def test_info_says_whether_urls_are_taken_and_within_what_bounds_but_not_the_list(live: str, client: Any) -> None:
    limits = httpx.get(f"{live}/info").json()["limits"]
    assert (limits["image_urls"], limits["url_max_bytes"], limits["url_timeout_s"], limits["url_max_redirects"]) == (
        True, MAX_BYTES, TIMEOUT_S, 2)
    assert "images.example.com" not in httpx.get(f"{live}/info").text
    assert client.get("/info").json()["limits"]["image_urls"] is False


def test_urls_are_refused_while_the_allowlist_is_empty(client: Any, origin: str) -> None:
    response = client.post("/embed", json={"image": f"{origin}/sneaker.png"})
    assert response.status_code == 422, response.text
    assert response.json()["error"] == {"type": "invalid_option", "message": "image 0: URLs are not fetched "
                                        "(MAE_URL_ALLOWLIST is empty); send the image as a data URI or base64"}


def test_a_redirect_is_checked_again(live: str, origin: str) -> None:
    port = origin.rsplit(":", 1)[1]
    refused(live, f"{origin}/redirect?to=http://localhost:{port}/sneaker.png", 422, "invalid_option",
            "URL host localhost is not allowed")
    refused(live, f"{origin}/redirect?to=https://example.org/x.png", 422, "invalid_option", "not allowed")
    refused(live, f"{origin}/loop", 422, "fetch_failed", "more than 2 redirects (MAE_URL_MAX_REDIRECTS)")


def test_a_slow_origin_is_cut_off_at_the_timeout(live: str, origin: str) -> None:
    started = time.monotonic()
    refused(live, f"{origin}/slow", 504, "fetch_timeout", f"within {TIMEOUT_S:g} s (MAE_URL_TIMEOUT_S=1)")
    assert time.monotonic() - started < TIMEOUT_S + 3
    started = time.monotonic()  # the request's own deadline, when shorter, bounds the fetch
    response = httpx.post(f"{live}/embed", json={"image": f"{origin}/slow"}, headers={"X-Request-Timeout": "0.3"},
                          timeout=10)
    assert response.status_code == 504 and "the request's deadline" in response.text, response.text
    assert time.monotonic() - started < 0.3 + 1.5


def test_a_failed_image_cancels_the_requests_other_fetches(live: str, origin: str) -> None:
    """The slow fetch beside a 404 is cancelled with the request's answer: it never runs on to its timeout."""
    timeouts = lambda: metric(httpx.get(f"{live}/metrics", timeout=5).text, "mae_url_fetches_total",  # noqa: E731
                              outcome="fetch_timeout")
    before = timeouts()
    response = embed(live, "native-json", [f"{origin}/slow", f"{origin}/missing.png"])
    assert response.status_code == 422 and "image 1: the URL answered HTTP 404" in response.text, response.text
    time.sleep(TIMEOUT_S + 0.5)
    assert timeouts() == before


def test_oversized_bodies_are_refused(live: str, origin: str) -> None:
    started = time.monotonic()
    refused(live, f"{origin}/announced-large", 413, "payload_too_large", f"bytes is over the limit of {MAX_BYTES}")
    assert time.monotonic() - started < 1.5  # refused on the header, not after the origin's 2 s
    refused(live, f"{origin}/chunked-large", 413, "payload_too_large", f"over the limit of {MAX_BYTES} bytes")


def test_what_is_not_an_image_is_refused_like_an_upload(live: str, origin: str) -> None:
    refused(live, f"{origin}/page.html", 415, "unsupported_media_type", "content type is text/html, not an image")
    refused(live, f"{origin}/missing.png", 422, "fetch_failed", "answered HTTP 404")
    upload = httpx.post(f"{live}/embed", files={"image": ("x.png", b"not an image at all", "image/png")}, timeout=10)
    fetched = embed(live, "native-json", [f"{origin}/not-an-image.png"])
    assert fetched.status_code == upload.status_code == 400, fetched.text
    assert fetched.json()["error"]["type"] == upload.json()["error"]["type"] == "invalid_image"
    closed = f"http://127.0.0.1:{_closed_port()}/x.png"
    refused(live, closed, 422, "fetch_failed", "cannot connect")
    text = httpx.get(f"{live}/metrics", timeout=5).text
    assert metric(text, "mae_url_fetches_total", outcome="fetch_failed") >= 2
    assert metric(text, "mae_url_fetches_total", outcome="unsupported_media_type") >= 1


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_allowlist_entries() -> None:
    allow = Allowlist(["Images.Example.com.", "*.cdn.example.org", "10.0.0.0/8", "::1"])
    assert allow.allows_host("images.example.com") and not allow.allows_host("example.com")
    assert allow.allows_host("a.b.cdn.example.org") and not allow.allows_host("cdn.example.org")
    assert not allow.allows_host("evilcdn.example.org")
    assert allow.allows_host("10.1.2.3") and allow.allows_host("::1") and not allow.allows_host("127.0.0.1")
    assert allow.allows_address(ipaddress.ip_address("10.9.9.9"))  # listed, though private
    assert allow.allows_address(ipaddress.ip_address("93.184.215.14"))  # public
    for private in ("127.0.0.1", "192.168.1.1", "169.254.169.254", "100.64.0.1", "0.0.0.0", "224.0.0.1",
                    "fe80::1", "fc00::1", "::ffff:127.0.0.1", "::"):
        assert not allow.allows_address(ipaddress.ip_address(private)), private
    assert not Allowlist([])
    for bad in ("http://images.example.com", "images.example.com:8080", "*example.com", "10.0.0.0/33"):
        with pytest.raises(ValueError, match="is not a host"):
            Allowlist([bad])
        with pytest.raises(ValueError, match="MAE_URL_ALLOWLIST|url_allowlist"):
            Settings(url_allowlist=bad)


@pytest.fixture(scope="module")
def tls_origin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """The origin over TLS on 127.0.0.1, its self-signed certificate for IP 127.0.0.1 only: (base URL, cert)."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a certificate")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Origin)
    httpd.daemon_threads = True
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"https://127.0.0.1:{httpd.server_address[1]}", cert
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_https_verifies_the_certificate_and_the_name(tiny_model_dir: Path, tls_origin: tuple[str, Path],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Trusted (SSL_CERT_FILE names the origin's certificate): the same embedding as the upload. Untrusted, or
    trusted but for another name than the URL's: fetch_failed, nothing embedded."""
    url, cert = tls_origin
    port = url.rsplit(":", 1)[1]
    with make_client(tiny_model_dir, url_allowlist="127.0.0.1") as client:
        untrusted = client.post("/embed", json={"image": f"{url}/sneaker.png"})
        assert untrusted.status_code == 422 and "certificate verify failed" in untrusted.text, untrusted.text
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    with make_client(tiny_model_dir, url_allowlist="127.0.0.1,localhost,::1") as client:
        fetched = client.post("/embed", json={"image": f"{url}/sneaker.png"})
        uploaded = client.post("/embed", json={"image": B64})
        assert fetched.status_code == 200, fetched.text
        np.testing.assert_allclose(fetched.json()["data"][0]["embedding"], uploaded.json()["data"][0]["embedding"],
                                   atol=1e-6, rtol=0)
        other_name = client.post("/embed", json={"image": f"https://localhost:{port}/sneaker.png"})
        assert other_name.status_code == 422 and "fetch_failed" in other_name.text, other_name.text
        assert "certificate" in other_name.text or "match" in other_name.text, other_name.text
