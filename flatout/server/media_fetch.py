"""Images named by http(s) URLs, fetched for a request, asynchronously and within bounds.

Nothing is fetched unless the server is started with `--allowed-media-domains`. A URL is fetched
only when its scheme is http or https and its host is one of those domains (`example.com`
exactly, `.example.com` that name and its subdomains, `*` any host). Then:

- The host name is resolved here (in the event loop's resolver threads) and every address it
  resolves to is checked; the connection goes to a checked address, with the Host header, TLS's
  SNI and the certificate check still naming the host. A DNS answer that changes between the
  check and the connection (rebinding) so reaches no address that was not checked.
- Addresses that are not globally routable (loopback, private, link-local, shared/CGNAT,
  multicast, reserved, unspecified, and their IPv4-mapped IPv6 forms) are refused unless the URL's
  host is listed by its exact name or address: a `*` or `.suffix` entry never reaches them, so a
  request cannot aim the server at its own network (SSRF) through a name it did not list.
- Redirects are followed by hand, at most MAX_REDIRECTS of them, each target checked exactly as
  the first URL (scheme, domain, addresses).
- One deadline covers it all (resolution, connection, redirects, body): `--media-fetch-timeout`.
- The body is streamed and the fetch aborted as soon as it passes `--max-media-fetch-bytes`, at
  once when the Content-Length header says so. Responses are asked for, and accepted, without a
  content encoding (images are compressed already; a gzip body could expand without bound).
- Proxies and credentials from the environment are not used (`trust_env` off).

Every failure is an OpenAIError (400) naming the image's place in the request, with its own code:
image_url_not_allowed (no connection was made), image_fetch_timeout, image_too_large,
image_fetch_failed. The bytes fetched go through the same header check, pixel limit and decoder as
a data: URL's (media.py).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import httpx

from flatout.server.defaults import DEFAULT_MAX_MEDIA_FETCH_BYTES, DEFAULT_MEDIA_FETCH_TIMEOUT
from flatout.server.errors import OpenAIError

MAX_REDIRECTS = 5
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_USER_AGENT = "flatout-media-fetch"

# (host, port) -> the addresses the host resolves to, as strings
Resolver = Callable[[str, int], Awaitable[list[str]]]


def is_http_url(url: str) -> bool:
    return url[:8].lower().startswith(("http://", "https://"))


def parse_allowed_domains(entries: Sequence[str] | None) -> tuple[str, ...]:
    """`--allowed-media-domains` normalized (lower case, no trailing dot, IPv6 without brackets);
    ValueError naming the flag for an entry that is not a host name, an address, `.suffix` or
    `*` (a URL, a port or a path)."""
    out: list[str] = []
    for entry in entries or ():
        name = entry.strip().lower().rstrip(".")
        if name.startswith("[") and name.endswith("]"):
            name = name[1:-1]
        if name == "*":
            out.append(name)
            continue
        if _is_address(name):
            out.append(str(ipaddress.ip_address(name)))  # one spelling: ::0001 is ::1
            continue
        suffix = "." if name.startswith(".") else ""
        host = _ascii_host(name[len(suffix):])
        if host is None:
            raise ValueError(f"--allowed-media-domains: {entry!r} is not a host name or address "
                             "(no scheme, port or path; '.example.com' for its subdomains, "
                             "'*' for any host)")
        out.append(suffix + host)
    return tuple(dict.fromkeys(out))


def _ascii_host(name: str) -> str | None:
    """A host name in the ASCII form URLs' hosts are matched in (IDNA), None if it is not one."""
    try:
        url = httpx.URL(f"http://{name}/")
    except (httpx.InvalidURL, ValueError):
        return None
    host = url.raw_host.decode("ascii")
    labels = host.split(".")
    if url.port is not None or url.path != "/" or url.userinfo or any(
            not label or not all(c.isalnum() or c in "-_" for c in label) for label in labels):
        return None
    return host


def url_host(url: httpx.URL) -> str:
    """The host of a URL as the allowed domains are matched against it: ASCII (IDNA), lower
    case, without a trailing dot, an address in its one spelling (IPv6 without brackets)."""
    host = url.raw_host.decode("ascii").lower().rstrip(".")
    return str(ipaddress.ip_address(host)) if _is_address(host) else host


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def is_public_address(address: str) -> bool:
    """Whether an address is globally routable (unicast): what a `*` or `.suffix` entry may
    reach."""
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


async def resolve_host(host: str, port: int) -> list[str]:
    """The host's addresses, resolved in the event loop's executor (the loop never blocks)."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


class _Timeout(Exception):
    """The fetch's deadline passed inside httpx (its own timeouts are the same deadline)."""


@dataclass
class MediaFetcher:
    """Fetches the bytes of http(s) image URLs (see the module's docstring for the rules)."""

    allowed_domains: tuple[str, ...] = ()
    timeout: float = DEFAULT_MEDIA_FETCH_TIMEOUT
    max_bytes: int = DEFAULT_MAX_MEDIA_FETCH_BYTES
    resolve: Resolver = field(default=resolve_host, repr=False)
    # the TLS context (default: httpx's, with certifi's roots), built once
    ssl_context: ssl.SSLContext | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not self.timeout > 0:
            raise ValueError(f"--media-fetch-timeout must be > 0 seconds, got {self.timeout}")
        if self.max_bytes < 1:
            raise ValueError(f"--max-media-fetch-bytes must be >= 1, got {self.max_bytes}")
        if self.allowed_domains and self.ssl_context is None:  # at startup, not in the loop
            self.ssl_context = httpx.create_ssl_context(trust_env=False)

    def host_allowed(self, host: str) -> tuple[bool, bool]:
        """(the host may be fetched from, it is listed by its exact name or address)."""
        exact = host in self.allowed_domains
        allowed = exact or any(d == "*" or (d.startswith(".") and (host == d[1:] or
                                                                   host.endswith(d)))
                               for d in self.allowed_domains)
        return allowed, exact

    async def fetch(self, url: str, param: str) -> bytes:
        """The body of the image at `url` (OpenAIError with `param` for any failure)."""
        if not self.allowed_domains:
            raise OpenAIError("image URLs over http(s) are not fetched by this server (start it "
                              "with --allowed-media-domains HOST ... to allow some hosts); send "
                              "the image as a base64 data: URL", param=param,
                              code="image_url_not_allowed")
        target = _parse(url, param)
        try:
            async with asyncio.timeout(self.timeout):
                return await self._follow(target, param)
        except (TimeoutError, _Timeout):
            raise OpenAIError(f"fetching the image from {url_host(target)!r} took longer than "
                              f"{self.timeout:g} s (--media-fetch-timeout)", param=param,
                              code="image_fetch_timeout") from None

    async def _follow(self, url: httpx.URL, param: str) -> bytes:
        async with httpx.AsyncClient(verify=self.ssl_context or True, trust_env=False,
                                     follow_redirects=False, timeout=self.timeout) as client:
            for _ in range(MAX_REDIRECTS + 1):
                addresses = await self._addresses(url, param)
                response = await self._send(client, url, addresses, param)
                try:
                    if response.status_code in _REDIRECT_STATUSES:
                        location = response.headers.get("location")
                        if not location:
                            raise _failed(f"{url_host(url)!r} answered a redirect without a "
                                          "Location", param)
                        url = _redirect_target(url, location, param)
                        continue
                    if response.status_code != 200:
                        raise _failed(f"{url_host(url)!r} answered HTTP "
                                      f"{response.status_code} for the image", param)
                    return await self._body(response, url, param)
                finally:
                    await response.aclose()
        raise _failed(f"more than {MAX_REDIRECTS} redirects fetching the image", param)

    async def _addresses(self, url: httpx.URL, param: str) -> list[str]:
        """The addresses `url` may be fetched from: its host allowed, and each address the host
        resolves to public unless the host is listed exactly (OpenAIError otherwise)."""
        host = url_host(url)
        allowed, exact = self.host_allowed(host)
        if not allowed:
            raise OpenAIError(f"the image URL's host {host!r} is not in this server's "
                              "--allowed-media-domains", param=param,
                              code="image_url_not_allowed")
        if _is_address(host):
            addresses = [host]
        else:
            try:
                addresses = await self.resolve(host, url.port or _default_port(url))
            except OSError:
                addresses = []
            if not addresses:
                raise _failed(f"cannot resolve the image URL's host {host!r}", param)
        if not exact and not all(is_public_address(a) for a in addresses):
            raise OpenAIError(f"the image URL's host {host!r} resolves to a loopback, private "
                              "or otherwise non-public address, which only a host listed by "
                              "its exact name in --allowed-media-domains may", param=param,
                              code="image_url_not_allowed")
        return addresses

    async def _send(self, client: httpx.AsyncClient, url: httpx.URL, addresses: list[str],
                    param: str) -> httpx.Response:
        """The response's head, from the first of the checked addresses that takes the
        connection; the Host header, SNI and certificate check name the URL's host."""
        headers = {"Host": url.netloc.decode("ascii"), "Accept": "image/*",
                   "Accept-Encoding": "identity", "User-Agent": _USER_AGENT}
        extensions = {"sni_hostname": url_host(url)} if url.scheme == "https" else {}
        error: httpx.HTTPError | None = None
        for address in addresses:
            request = client.build_request("GET", url.copy_with(host=address), headers=headers,
                                           extensions=extensions)
            try:
                return await client.send(request, stream=True)
            except httpx.TimeoutException:
                raise _Timeout from None
            except httpx.InvalidURL:  # httpx builds a redirect's next request even unasked
                raise OpenAIError(f"{url_host(url)!r} redirected the image to a URL that "
                                  "cannot be fetched", param=param,
                                  code="image_url_not_allowed") from None
            except httpx.ConnectError as e:  # the next address may take it
                error = e
            except httpx.HTTPError as e:
                error = e
                break
        raise _failed(f"cannot fetch the image from {url_host(url)!r} "
                      f"({type(error).__name__})", param)

    async def _body(self, response: httpx.Response, url: httpx.URL, param: str) -> bytes:
        encoding = response.headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            raise _failed(f"{url_host(url)!r} sent the image with Content-Encoding "
                          f"{encoding[:40]!r}; only unencoded bodies are accepted", param)
        length = response.headers.get("content-length", "").strip()
        if length.isdigit() and int(length) > self.max_bytes:
            raise self._too_large(url, param)
        chunks: list[bytes] = []
        size = 0
        try:
            async for chunk in response.aiter_raw():
                size += len(chunk)
                if size > self.max_bytes:
                    raise self._too_large(url, param)
                chunks.append(chunk)
        except httpx.TimeoutException:
            raise _Timeout from None
        except httpx.HTTPError as e:
            raise _failed(f"the image's body from {url_host(url)!r} broke off "
                          f"({type(e).__name__})", param) from None
        return b"".join(chunks)

    def _too_large(self, url: httpx.URL, param: str) -> OpenAIError:
        return OpenAIError(f"the image at {url_host(url)!r} is larger than {self.max_bytes} bytes "
                           "(--max-media-fetch-bytes)", param=param, code="image_too_large")


def _parse(url: str, param: str) -> httpx.URL:
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, ValueError):
        raise OpenAIError("the image URL is not a valid URL", param=param,
                          code="image_url_not_allowed") from None
    if parsed.scheme not in ("http", "https"):
        raise OpenAIError(f"image URL scheme {parsed.scheme!r} is not fetched (only http and "
                          "https)", param=param, code="image_url_not_allowed")
    if not parsed.raw_host:
        raise OpenAIError("the image URL has no host", param=param, code="image_url_not_allowed")
    if parsed.userinfo:
        raise OpenAIError("image URLs with credentials (user:password@) are not fetched",
                          param=param, code="image_url_not_allowed")
    return parsed


def _redirect_target(url: httpx.URL, location: str, param: str) -> httpx.URL:
    try:
        target = url.join(location)
    except (httpx.InvalidURL, ValueError):
        raise OpenAIError(f"{url_host(url)!r} redirected the image to an invalid URL",
                          param=param, code="image_url_not_allowed") from None
    return _parse(str(target), param)


def _default_port(url: httpx.URL) -> int:
    return 443 if url.scheme == "https" else 80


def _failed(message: str, param: str) -> OpenAIError:
    return OpenAIError(message, param=param, code="image_fetch_failed")
