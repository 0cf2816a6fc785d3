"""http(s) image URLs: fetched only from --allowed-media-domains, through a local image host
(tests/server/image_host.py). Every branch of media_fetch.py: hosts and schemes refused before any
connection, non-public addresses refused unless listed exactly (the connection pinned to the
checked address, TLS still checking the name), redirects checked hop by hop and bounded, one
deadline for the whole fetch, the byte limit from Content-Length and while streaming, HTTP and
connection errors; then `flatout serve --model demo-vl` answering an http image as it answers the
same image sent as a data: URL."""

from __future__ import annotations

import asyncio
import base64
import io
import shutil
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from flatout.server.errors import OpenAIError
from flatout.server.media import ImageRef, MediaPolicy
from flatout.server.media_fetch import (
    MAX_REDIRECTS,
    MediaFetcher,
    is_public_address,
    parse_allowed_domains,
    url_host,
)
from tests.server.image_host import ImageHost, wait_until
from tests.server.server_process import ServerProcess

PARAM = "messages[0].content[1].image_url"


def png(size: tuple[int, int], seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def jpeg(size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size[::-1], (200, 30, 90)).save(buf, format="JPEG")
    return buf.getvalue()


PNG = png((112, 140), 1)
JPEG = jpeg((84, 112))


@pytest.fixture(scope="module")
def host() -> Iterator[ImageHost]:
    h = ImageHost(PNG, JPEG)
    try:
        yield h
    finally:
        h.stop()


def fetch(fetcher: MediaFetcher, url: str) -> bytes:
    return asyncio.run(fetcher.fetch(url, PARAM))


def fetch_error(fetcher: MediaFetcher, url: str, code: str) -> OpenAIError:
    with pytest.raises(OpenAIError) as e:
        fetch(fetcher, url)
    err = e.value
    assert (err.status, err.param, err.code, err.type) == (
        400, PARAM, code, "invalid_request_error"), err.body()
    return err


def resolver(table: dict[str, list[str]]):  # noqa: ANN201
    """A DNS stand-in: the names of `table` resolve to its addresses, others fail."""
    async def resolve(host: str, port: int) -> list[str]:
        if host not in table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return table[host]
    return resolve


def local(**kw) -> MediaFetcher:  # noqa: ANN003
    kw.setdefault("timeout", 5.0)
    return MediaFetcher(("127.0.0.1",), **kw)


# -- what is allowed ------------------------------------------------------------------------------

def test_allowed_domains_are_normalized_and_checked() -> None:
    assert parse_allowed_domains(None) == ()
    assert parse_allowed_domains(["Images.Example.COM.", ".cdn.example.com", "*", "[::1]",
                                  "127.0.0.1", "bücher.de", "images.example.com", "::0001",
                                  "FE80::A"]) == (
        "images.example.com", ".cdn.example.com", "*", "::1", "127.0.0.1", "xn--bcher-kva.de",
        "fe80::a")
    for bad in ["http://example.com", "example.com:8080", "example.com/images", "a..b", "",
                "user@example.com", "exa mple.com"]:
        with pytest.raises(ValueError, match="--allowed-media-domains"):
            parse_allowed_domains([bad])


def test_host_matching() -> None:
    f = MediaFetcher(("images.example.com", ".cdn.example.com"))
    assert f.host_allowed("images.example.com") == (True, True)
    assert f.host_allowed("cdn.example.com") == (True, False)
    assert f.host_allowed("a.b.cdn.example.com") == (True, False)
    assert f.host_allowed("evilcdn.example.com") == (False, False)
    assert f.host_allowed("example.com") == (False, False)
    assert f.host_allowed("images.example.com.evil.org") == (False, False)
    assert MediaFetcher(("*",)).host_allowed("anything.org") == (True, False)


@pytest.mark.parametrize(("address", "public"), [
    ("93.184.216.34", True), ("2606:2800:220:1:248:1893:25c8:1946", True),
    ("127.0.0.1", False), ("127.9.9.9", False), ("::1", False), ("10.1.2.3", False),
    ("172.16.0.1", False), ("192.168.1.1", False), ("169.254.169.254", False),
    ("fe80::1", False), ("fc00::1", False), ("100.64.0.1", False), ("0.0.0.0", False),
    ("::", False), ("224.0.0.1", False), ("ff02::1", False), ("::ffff:127.0.0.1", False),
    ("::ffff:10.0.0.1", False), ("::ffff:93.184.216.34", True), ("240.0.0.1", False),
])
def test_public_addresses(address: str, public: bool) -> None:
    assert is_public_address(address) is public


def test_nothing_is_fetched_without_the_flag(host: ImageHost) -> None:
    before = len(host.requests)
    err = fetch_error(MediaFetcher(), host.url("/shot.png"), "image_url_not_allowed")
    assert "--allowed-media-domains" in err.message and "not fetched" in err.message
    assert len(host.requests) == before  # no connection was made


def test_a_host_not_listed_is_refused_before_connecting(host: ImageHost) -> None:
    before = len(host.requests)
    f = MediaFetcher(("images.example.com",), resolve=resolver({"localhost": ["127.0.0.1"]}))
    err = fetch_error(f, host.url("/shot.png"), "image_url_not_allowed")
    assert "'127.0.0.1' is not in" in err.message
    fetch_error(f, host.url("/shot.png", host="localhost"), "image_url_not_allowed")
    assert len(host.requests) == before


@pytest.mark.parametrize("url", ["http://user:pw@127.0.0.1/shot.png", "http:///shot.png",
                                 "http://[::1/x"])
def test_urls_with_credentials_or_without_a_host_are_refused(url: str) -> None:
    fetch_error(local(), url, "image_url_not_allowed")


# -- fetching -------------------------------------------------------------------------------------

def test_png_and_jpeg_are_fetched_from_an_address_listed_exactly(host: ImageHost) -> None:
    f = local()
    assert fetch(f, host.url("/shot.png")) == PNG
    assert fetch(f, host.url("/shot.jpg")) == JPEG
    assert host.requests[-1] == ("/shot.jpg", f"127.0.0.1:{host.port}")

def test_an_address_matches_in_any_spelling() -> None:
    f = MediaFetcher(parse_allowed_domains(["[0:0::1]", "127.0.0.1"]))
    for url in ("http://[::0001]/x.png", "http://[0::1]:8080/x.png", "http://127.0.0.1./x"):
        assert f.host_allowed(url_host(httpx.URL(url))) == (True, True), url
    assert f.host_allowed(url_host(httpx.URL("http://[::2]/x.png"))) == (False, False)


def test_non_public_addresses_need_the_exact_name(host: ImageHost) -> None:
    """`*` and `.suffix` entries reach public addresses only: not the loopback, not a private
    address among public ones; listing the name itself allows it (the connection then goes to
    the address that was checked, with the name in the Host header)."""
    before = len(host.requests)
    dns = {"images.test": ["127.0.0.1"], "mixed.images.test": ["93.184.216.34", "10.0.0.7"]}
    for allowed in (("*",), (".images.test",)):
        f = MediaFetcher(allowed, resolve=resolver(dns))
        err = fetch_error(f, host.url("/shot.png", host="images.test"), "image_url_not_allowed")
        assert "non-public" in err.message and "127.0.0.1" not in err.message
        fetch_error(f, host.url("/shot.png", host="mixed.images.test"), "image_url_not_allowed")
    fetch_error(MediaFetcher(("*",)), host.url("/shot.png"), "image_url_not_allowed")
    assert len(host.requests) == before
    f = MediaFetcher(("images.test",), resolve=resolver(dns))
    assert fetch(f, host.url("/shot.png", host="images.test")) == PNG
    assert host.requests[-1] == ("/shot.png", f"images.test:{host.port}")


def test_the_next_checked_address_is_tried_when_one_refuses(host: ImageHost) -> None:
    # nothing listens on 127.0.0.2 (the host is bound to 127.0.0.1)
    f = MediaFetcher(("images.test",), resolve=resolver({"images.test": ["127.0.0.2",
                                                                         "127.0.0.1"]}))
    assert fetch(f, host.url("/shot.png", host="images.test")) == PNG


def test_a_name_that_does_not_resolve_fails(host: ImageHost) -> None:
    f = MediaFetcher(("nowhere.test",), resolve=resolver({}))
    err = fetch_error(f, host.url("/shot.png", host="nowhere.test"), "image_fetch_failed")
    assert "cannot resolve" in err.message
    f = MediaFetcher(("empty.test",), resolve=resolver({"empty.test": []}))
    fetch_error(f, host.url("/shot.png", host="empty.test"), "image_fetch_failed")


def test_the_real_resolver_is_used_by_default(host: ImageHost) -> None:
    assert fetch(MediaFetcher(("localhost",)), host.url("/shot.png", host="localhost")) == PNG


def test_http_errors_and_refused_connections_fail(host: ImageHost) -> None:
    err = fetch_error(local(), host.url("/missing"), "image_fetch_failed")
    assert "HTTP 404" in err.message
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    err = fetch_error(local(), f"http://127.0.0.1:{port}/shot.png", "image_fetch_failed")
    assert "ConnectError" in err.message


def test_encoded_bodies_are_refused(host: ImageHost) -> None:
    err = fetch_error(local(), host.url("/gzip"), "image_fetch_failed")
    assert "gzip" in err.message


# -- redirects ------------------------------------------------------------------------------------

def test_redirects_are_followed_to_allowed_hosts(host: ImageHost) -> None:
    assert fetch(local(), host.url("/redirect?to=/shot.jpg")) == JPEG
    assert fetch(local(), host.url("/redirect?to=" + host.url("/shot.png"))) == PNG
    assert fetch(local(), host.url(f"/chain/{MAX_REDIRECTS}")) == PNG


def test_redirects_are_bounded(host: ImageHost) -> None:
    err = fetch_error(local(), host.url(f"/chain/{MAX_REDIRECTS + 1}"), "image_fetch_failed")
    assert f"more than {MAX_REDIRECTS} redirects" in err.message
    fetch_error(local(), host.url("/loop"), "image_fetch_failed")
    err = fetch_error(local(), host.url("/no-location"), "image_fetch_failed")
    assert "without a Location" in err.message


def test_a_redirect_is_checked_like_the_first_url(host: ImageHost) -> None:
    before = [h for _, h in host.requests]
    to_localhost = host.url("/redirect?to=" + host.url("/shot.png", host="localhost"))
    err = fetch_error(local(), to_localhost, "image_url_not_allowed")
    assert "'localhost' is not in" in err.message
    assert not any(h.startswith("localhost") for _, h in host.requests[len(before):])
    for target in ("file:///etc/passwd", "ftp://127.0.0.1/x.png", "data:image/png;base64,AAAA"):
        err = fetch_error(local(), host.url("/redirect?to=" + target), "image_url_not_allowed")
        assert "scheme" in err.message or "cannot be fetched" in err.message
    # `*` may redirect to a public name only: a redirect to the loopback is refused
    dns = {"public.test": ["93.184.216.34"], "localhost": ["127.0.0.1"]}
    f = MediaFetcher(("public.test", "*"), resolve=resolver(dns))
    fetch_error(f, host.url("/redirect?to=" + host.url("/shot.png", host="localhost")),
                "image_url_not_allowed")


# -- time and size --------------------------------------------------------------------------------

def test_a_slow_answer_times_out(host: ImageHost) -> None:
    start = time.monotonic()
    err = fetch_error(local(timeout=0.5), host.url("/slow-head?s=30"), "image_fetch_timeout")
    assert time.monotonic() - start < 3 and "--media-fetch-timeout" in err.message


def test_the_deadline_covers_the_whole_body(host: ImageHost) -> None:
    """Each piece of /slow-body arrives well within the timeout; the whole does not."""
    start = time.monotonic()
    fetch_error(local(timeout=1.0), host.url("/slow-body"), "image_fetch_timeout")
    assert time.monotonic() - start < 3


def test_a_declared_length_over_the_limit_is_refused_at_once(host: ImageHost) -> None:
    start = time.monotonic()
    err = fetch_error(local(max_bytes=10**6), host.url("/huge-declared"), "image_too_large")
    assert time.monotonic() - start < 2 and "--max-media-fetch-bytes" in err.message
    fetch_error(local(max_bytes=len(PNG) - 1), host.url("/shot.png"), "image_too_large")
    assert fetch(local(max_bytes=len(PNG)), host.url("/shot.png")) == PNG


def test_a_body_is_abandoned_as_soon_as_it_passes_the_limit(host: ImageHost) -> None:
    host.stream_done.clear()
    host.streamed = 0
    fetch_error(local(max_bytes=2 * 2**20), host.url("/huge-stream"), "image_too_large")
    # the host's writes fail once the connection is gone: it sent the limit plus what the
    # sockets' buffers held, not the 2 GB it would have
    assert wait_until(host.stream_done.is_set, 10)
    assert host.streamed < 64 * 2**20


# -- TLS ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tls_host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ImageHost, Path]]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    d = tmp_path_factory.mktemp("tls")
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    h = ImageHost(PNG, JPEG, tls=(cert, key))
    try:
        yield h, cert
    finally:
        h.stop()


def test_https_checks_the_certificate_of_the_name_not_the_address(tls_host) -> None:  # noqa: ANN001
    """The connection goes to the checked address; SNI and the certificate check still use the
    URL's name, so a name the certificate does not cover fails even at the same address."""
    h, cert = tls_host
    trust = ssl.create_default_context(cafile=str(cert))
    dns = {"localhost": ["127.0.0.1"], "images.test": ["127.0.0.1"]}
    f = MediaFetcher(("localhost", "images.test"), resolve=resolver(dns), ssl_context=trust)
    assert fetch(f, h.url("/shot.png", host="localhost")) == PNG
    assert h.requests[-1] == ("/shot.png", f"localhost:{h.port}")
    err = fetch_error(f, h.url("/shot.png", host="images.test"), "image_fetch_failed")
    assert "ConnectError" in err.message
    # without the test's certificate among its roots, the default context refuses it
    f = MediaFetcher(("localhost",), resolve=resolver(dns))
    fetch_error(f, h.url("/shot.png", host="localhost"), "image_fetch_failed")


# -- through the media policy ---------------------------------------------------------------------

def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def test_fetched_images_decode_as_data_urls_do(host: ImageHost) -> None:
    policy = MediaPolicy(fetcher=local())
    sizes: list[list[tuple[int, int]]] = []
    refs = [ImageRef(host.url("/shot.png"), "a"), ImageRef(data_url(PNG), "b")]
    fetched, inline = asyncio.run(policy.load(refs, sizes.append))
    assert sizes == [[(112, 140), (112, 140)]]
    np.testing.assert_array_equal(fetched, inline)


def test_fetched_bytes_meet_the_same_checks(host: ImageHost) -> None:
    policy = MediaPolicy(fetcher=local())
    with pytest.raises(OpenAIError) as e:
        asyncio.run(policy.load([ImageRef(host.url("/text"), PARAM)], lambda sizes: None))
    assert (e.value.code, e.value.param) == ("invalid_image", PARAM)
    assert "not a decodable image" in e.value.message


def test_the_first_failure_cancels_the_other_fetches(host: ImageHost) -> None:
    policy = MediaPolicy(fetcher=local(timeout=30.0))
    refs = [ImageRef(host.url("/slow-head?s=30"), "slow"), ImageRef(host.url("/missing"), PARAM)]
    start = time.monotonic()
    with pytest.raises(OpenAIError) as e:
        asyncio.run(policy.load(refs, lambda sizes: None))
    assert e.value.param == PARAM and e.value.code == "image_fetch_failed"
    assert time.monotonic() - start < 5


# -- the server -----------------------------------------------------------------------------------

def test_serve_help_documents_the_flags(capsys: pytest.CaptureFixture[str]) -> None:
    from flatout.cli import main

    with pytest.raises(SystemExit) as e:
        main(["serve", "--help"])
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    for flag in ("--allowed-media-domains HOST [HOST ...]", "--media-fetch-timeout",
                 "--max-media-fetch-bytes"):
        assert flag in out
    assert "default: none, nothing is fetched" in out


@pytest.mark.parametrize(("flags", "message"), [
    (["--allowed-media-domains", "http://example.com/"], "--allowed-media-domains"),
    (["--allowed-media-domains", "127.0.0.1", "--media-fetch-timeout", "0"],
     "--media-fetch-timeout"),
    (["--allowed-media-domains", "127.0.0.1", "--max-media-fetch-bytes", "0"],
     "--max-media-fetch-bytes"),
])
def test_bad_fetch_flags_fail_at_startup(flags: list[str], message: str) -> None:
    r = subprocess.run([sys.executable, "-m", "flatout.cli", "serve", "--port", "0", *flags],
                       capture_output=True, text=True, timeout=120,
                       cwd=Path(__file__).resolve().parents[2])
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and message in r.stderr and "Traceback" not in r.stderr


@pytest.fixture(scope="module")
def vl_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    tmp = tmp_path_factory.mktemp("demo-vl-fetch")
    s = ServerProcess(["--model", "demo-vl", "--max-model-len", "512",
                       "--allowed-media-domains", "127.0.0.1", "--max-media-fetch-bytes",
                       str(2**20)], tmp / "serve.log", env={"FLATOUT_CACHE": str(tmp)})
    try:
        yield s
    finally:
        s.stop()


def ask(server: ServerProcess, url: str, **kw) -> dict:  # noqa: ANN003
    body = {"model": server.model, "max_tokens": 8, "temperature": 0, "logprobs": True,
            "messages": [{"role": "user", "content": [
                {"type": "text", "text": "What is this?"},
                {"type": "image_url", "image_url": {"url": url}}]}], **kw}
    return httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=120).json()


def test_served_http_image_answers_as_its_data_url(vl_server: ServerProcess,
                                                   host: ImageHost) -> None:
    shot = png((112, 168), 7)
    other = ImageHost(shot, JPEG)
    try:
        by_url = ask(vl_server, other.url("/shot.png"))
        inline = ask(vl_server, data_url(shot))
    finally:
        other.stop()
    tokens = [[t["token"] for t in r["choices"][0]["logprobs"]["content"]]
              for r in (by_url, inline)]
    assert tokens[0] == tokens[1] and len(tokens[0]) == 8
    assert by_url["choices"][0]["message"] == inline["choices"][0]["message"]
    for key in ("prompt_tokens", "completion_tokens"):
        assert by_url["usage"][key] == inline["usage"][key]
    assert by_url["usage"]["prompt_tokens"] > 112 * 168 // 28**2  # the image's tokens
    # a different image at the same kind of URL gets another answer
    other_reply = ask(vl_server, host.url("/shot.png"))
    assert other_reply["choices"][0]["logprobs"]["content"] != \
        by_url["choices"][0]["logprobs"]["content"]


@pytest.mark.parametrize(("path", "code"), [
    ("/missing", "image_fetch_failed"),
    ("/huge-declared", "image_too_large"),
    ("/text", "invalid_image"),
])
def test_served_fetch_errors_are_400(vl_server: ServerProcess, host: ImageHost, path: str,
                                     code: str) -> None:
    c = openai.OpenAI(base_url=f"{vl_server.url}/v1", api_key="EMPTY", max_retries=0)
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model=vl_server.model, max_tokens=4, messages=[
            {"role": "user", "content": [{"type": "text", "text": "hi"}, {
                "type": "image_url", "image_url": {"url": host.url(path)}}]}])
    err = e.value.body
    assert (err["code"], err["param"], err["type"]) == (code, PARAM, "invalid_request_error")


def test_served_hosts_not_listed_are_refused(vl_server: ServerProcess, host: ImageHost) -> None:
    before = len(host.requests)
    r = ask(vl_server, host.url("/shot.png", host="localhost"))
    assert r["error"]["code"] == "image_url_not_allowed" and r["error"]["param"] == PARAM
    assert len(host.requests) == before
    ok = ask(vl_server, host.url("/shot.png"))  # still serving
    assert ok["choices"][0]["finish_reason"] in ("stop", "length")
