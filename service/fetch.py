"""Images by URL, off unless MAE_URL_ALLOWLIST lists hosts: the allow-list, the address rules, one bounded GET.

A URL is fetched only when its host is listed, and then only from addresses that are public or listed
themselves: every address the host resolves to is checked (a name listed that resolves to 127.0.0.1 is
refused), and the connection goes to the checked address, not to a second resolution (DNS rebinding).
Each redirect is checked again in full. The fetch is bounded in time (MAE_URL_TIMEOUT_S and the request's
deadline, all redirects together), in bytes (MAE_URL_MAX_BYTES, announced or streamed) and in redirects
(MAE_URL_MAX_REDIRECTS); the bytes it returns are then decoded and checked exactly as an upload's.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
import ssl
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cached_property
from urllib.parse import quote, urljoin, urlsplit

import h11

from service import __version__
from service.errors import (
    FetchFailed,
    FetchTimeout,
    InvalidOption,
    PayloadTooLarge,
    ServiceError,
    UnsupportedMediaType,
)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

FETCHES_PER_REQUEST = 4  # a request's URLs fetched (and decoded) at once: its memory is a few bodies, not 32
REDIRECTS = frozenset({301, 302, 303, 307, 308})
MAX_HEADER_BYTES = 16 * 1024  # the status line and headers of a response
READ_CHUNK = 64 * 1024
_HOST_NAME = re.compile(r"^[a-z0-9_-]+(\.[a-z0-9_-]+)*$")
# the characters a request target keeps as they are; anything else (spaces, non-ASCII) is percent-encoded
_TARGET_SAFE = "/?:@!$&'()*+,;=%~-._[]"


@dataclass(frozen=True)
class ImageURL:
    """An image given as an http(s) URL: `image_bytes` recognized it, the server fetches it (`Fetcher`)."""

    url: str


@dataclass(frozen=True)
class _Target:
    """One checked URL: what to resolve, where to connect, what to ask for."""

    scheme: str
    host: str  # lower case, IDNA-encoded, no trailing dot; an IPv6 address without brackets
    port: int
    target: str  # path and query, percent-encoded

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == {"http": 80, "https": 443}[self.scheme] else f"{host}:{self.port}"


def _ip(text: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


class Allowlist:
    """MAE_URL_ALLOWLIST: which URLs may be fetched, and from which addresses.

    Entries: `images.example.com` (that host), `*.example.com` (any host under example.com, not
    example.com itself), `*` (any host), an IP address or CIDR network (`127.0.0.1`, `10.0.0.0/8`, `::1`):
    URLs naming such an address, and hosts resolving into it. Any port, http and https. A host name
    entry never allows a private address: every address a host resolves to must be public (global
    unicast) or inside a listed address or network, else the URL is refused; listing an address or
    network is the one way to allow private, loopback, link-local or reserved ones.
    """

    def __init__(self, entries: Iterable[str]):
        """ValueError naming the entry when one is none of the forms above."""
        self.names: set[str] = set()
        self.suffixes: list[str] = []  # ".example.com" for *.example.com
        self.networks: list[IPNetwork] = []
        self.any_host = False
        for raw in entries:
            entry = raw.strip().lower().rstrip(".")
            if entry == "*":
                self.any_host = True
            elif entry.startswith("*.") and _HOST_NAME.match(entry[2:]):
                self.suffixes.append(entry[1:])
            elif _HOST_NAME.match(entry) and not entry.replace(".", "").isdigit():
                self.names.add(entry)
            else:
                try:
                    self.networks.append(ipaddress.ip_network(entry.strip("[]"), strict=False))
                except ValueError:
                    raise ValueError(f"{raw!r} is not a host (images.example.com), a wildcard (*.example.com), "
                                     "'*', an IP address or a CIDR network") from None

    def __bool__(self) -> bool:
        return self.any_host or bool(self.names or self.suffixes or self.networks)

    def allows_host(self, host: str) -> bool:
        """The URL's host (lower case, IDNA) is listed: by name, wildcard, '*', or as an address in a network."""
        if self.any_host:
            return True
        ip = _ip(host)
        if ip is not None:
            return self.listed(ip)
        return host in self.names or any(host.endswith(suffix) for suffix in self.suffixes)

    def listed(self, ip: IPAddress) -> bool:
        return any(ip in network for network in self.networks)

    def allows_address(self, ip: IPAddress) -> bool:
        """An address may be connected to: listed, or global unicast (not private, loopback, link-local,
        shared, reserved, unspecified or multicast; an IPv4-mapped IPv6 address is judged as its IPv4)."""
        if self.listed(ip):
            return True
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
            if self.listed(ip):
                return True
        return ip.is_global and not ip.is_multicast


class _Redirect(Exception):
    def __init__(self, location: str):
        self.location = location


class Fetcher:
    """The bounded GET of an image URL (see the module), counted by outcome through `observe`."""

    def __init__(self, allowlist: Allowlist, *, timeout_s: float, max_bytes: int, max_redirects: int,
                 observe: Callable[[str], None] = lambda outcome: None):
        """`observe(outcome)`: one fetch ended, "ok" or the error type."""
        self.allowlist, self.timeout_s, self.max_bytes, self.max_redirects = allowlist, timeout_s, max_bytes, max_redirects
        self.observe = observe

    @cached_property
    def _tls(self) -> ssl.SSLContext:
        """The system's CA certificates, hostname verification on (loaded once, at the first https URL)."""
        return ssl.create_default_context()

    def check(self, url: str, index: int) -> _Target:
        """A URL this server may fetch (422 invalid_option otherwise): allowed scheme and host, no credentials."""
        if not self.allowlist:
            raise InvalidOption(f"image {index}: URLs are not fetched (MAE_URL_ALLOWLIST is empty); send the image "
                                "as a data URI or base64")
        try:
            parts = urlsplit(url)
            port = parts.port
            host = (parts.hostname or "").encode("idna").decode("ascii").rstrip(".")
        except (ValueError, UnicodeError) as e:
            raise InvalidOption(f"image {index}: not a valid URL ({e})") from e
        if parts.scheme not in ("http", "https") or not (_HOST_NAME.match(host) or _ip(host)):
            raise InvalidOption(f"image {index}: not a valid http(s) URL with a host")
        if "@" in parts.netloc:
            raise InvalidOption(f"image {index}: URLs with credentials (user@host) are not fetched")
        if not self.allowlist.allows_host(host):
            raise InvalidOption(f"image {index}: URL host {host} is not allowed (MAE_URL_ALLOWLIST)")
        target = quote(parts.path or "/", safe=_TARGET_SAFE) + (f"?{quote(parts.query, safe=_TARGET_SAFE)}"
                                                                 if parts.query else "")
        return _Target(parts.scheme, host, port or {"http": 80, "https": 443}[parts.scheme], target)

    async def fetch(self, image: ImageURL, index: int, deadline: float) -> bytes:
        """The body of the image at `image.url`, following redirects; every bound of the module applies, and the
        whole fetch ends by `deadline` (time.monotonic()) too."""
        budget = min(self.timeout_s, deadline - time.monotonic())
        try:
            try:
                async with asyncio.timeout(max(0.0, budget)):
                    data = await self._follow(image.url, index)
            except TimeoutError:
                bound = (f"MAE_URL_TIMEOUT_S={self.timeout_s:g}" if budget >= self.timeout_s
                         else "the request's deadline")
                raise FetchTimeout(f"image {index}: the URL did not answer within {max(0.0, budget):.3g} s "
                                   f"({bound})") from None
        except ServiceError as e:
            self.observe(e.type)
            raise
        self.observe("ok")
        return data

    async def _follow(self, url: str, index: int) -> bytes:
        for _ in range(self.max_redirects + 1):
            target = self.check(url, index)
            addresses = await self._resolve(target, index)
            try:
                return await self._get(target, addresses, index)
            except _Redirect as redirect:
                url = urljoin(url, redirect.location)
        raise FetchFailed(f"image {index}: more than {self.max_redirects} redirects (MAE_URL_MAX_REDIRECTS)")

    async def _resolve(self, target: _Target, index: int) -> list[IPAddress]:
        """Every address the host resolves to, each allowed (else 422: one refused address refuses the host)."""
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError) as e:
            raise FetchFailed(f"image {index}: cannot resolve {target.host} ({e})") from e
        addresses = list(dict.fromkeys(ipaddress.ip_address(info[4][0]) for info in infos))
        refused = [ip for ip in addresses if not self.allowlist.allows_address(ip)]
        if refused or not addresses:
            raise InvalidOption(f"image {index}: {target.host} resolves to {refused[0] if refused else 'nothing'}, "
                                "not a public address; list the address or its network in MAE_URL_ALLOWLIST "
                                "to allow it")
        return addresses

    async def _connect(self, target: _Target, addresses: list[IPAddress],
                       index: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A connection to the first checked address that answers (TLS with SNI and hostname verification)."""
        tls = dict(ssl=self._tls, server_hostname=target.host) if target.scheme == "https" else {}
        error: OSError | None = None
        for ip in addresses:
            try:
                return await asyncio.open_connection(str(ip), target.port, **tls, limit=READ_CHUNK)
            except OSError as e:  # refused, unreachable, a TLS handshake or certificate failure
                error = e
        raise FetchFailed(f"image {index}: cannot connect to {target.host_header} ({error})")

    async def _get(self, target: _Target, addresses: list[IPAddress], index: int) -> bytes:
        """One GET: the body of a 200 with an image content type, within max_bytes; _Redirect for a redirect."""
        reader, writer = await self._connect(target, addresses, index)
        connection = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEADER_BYTES)
        try:
            writer.write(connection.send(h11.Request(method="GET", target=target.target, headers=[
                ("Host", target.host_header), ("User-Agent", f"mae-service/{__version__}"),
                ("Accept", "image/*"), ("Accept-Encoding", "identity"), ("Connection", "close")])))
            writer.write(connection.send(h11.EndOfMessage()))
            await writer.drain()
            response = await _next_event(connection, reader)
            while isinstance(response, h11.InformationalResponse):
                response = await _next_event(connection, reader)
            assert isinstance(response, h11.Response)
            headers = {name.decode("latin-1"): value.decode("latin-1") for name, value in response.headers}
            self._check_response(response.status_code, headers, index)
            body = bytearray()
            while not isinstance(event := await _next_event(connection, reader), h11.EndOfMessage):
                if isinstance(event, h11.Data):
                    body += event.data
                    if len(body) > self.max_bytes:
                        raise PayloadTooLarge(f"image {index}: the URL's body is over the limit of {self.max_bytes} "
                                              "bytes (MAE_URL_MAX_BYTES)")
            return bytes(body)
        except h11.ProtocolError as e:
            raise FetchFailed(f"image {index}: {target.host_header} answered malformed HTTP ({e})") from e
        except OSError as e:
            raise FetchFailed(f"image {index}: the connection to {target.host_header} failed ({e})") from e
        finally:
            writer.transport.abort()

    def _check_response(self, status: int, headers: dict[str, str], index: int) -> None:
        """A response worth reading: a 200 of an image, encoded as itself, not announced over max_bytes."""
        if status in REDIRECTS and "location" in headers:
            raise _Redirect(headers["location"])
        if status != 200:
            raise FetchFailed(f"image {index}: the URL answered HTTP {status}")
        content_type = headers.get("content-type", "").split(";")[0].strip().lower()
        # no type or octet-stream is what object stores serve for an upload; the decoder reads the format itself
        if content_type and not content_type.startswith("image/") and content_type != "application/octet-stream":
            raise UnsupportedMediaType(f"image {index}: the URL's content type is {content_type}, not an image")
        encoding = headers.get("content-encoding", "identity").strip().lower()
        if encoding != "identity":
            raise UnsupportedMediaType(f"image {index}: the URL's body is {encoding}-encoded; only identity is read")
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_bytes:
            raise PayloadTooLarge(f"image {index}: the URL's body of {int(length)} bytes is over the limit of "
                                  f"{self.max_bytes} bytes (MAE_URL_MAX_BYTES)")


async def _next_event(connection: h11.Connection, reader: asyncio.StreamReader) -> object:
    """The next h11 event of the response, reading from the socket as needed (h11.RemoteProtocolError when the
    peer closes before the response is complete)."""
    while (event := connection.next_event()) is h11.NEED_DATA:
        connection.receive_data(await reader.read(READ_CHUNK))
    if isinstance(event, h11.ConnectionClosed):
        raise h11.RemoteProtocolError("connection closed before the response ended")
    return event
