"""No secrets at rest: credentials in source URLs (presigned query parameters,
`user:password@`) are redacted in everything a convert writes, and in its errors,
while the real URL is the one read."""

from __future__ import annotations

import base64
import functools
import http.server
import json
import threading
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import convert_config

import tokshard.pipeline.convert.stages as stages
from tokshard.errors import JobError, SourceError
from tokshard.pipeline.convert.config import ConvertConfig
from tokshard.pipeline.convert.engines.retry import RetryPolicy, UnitFailure, describe
from tokshard.pipeline.convert.job import _failure_message, convert
from tokshard.pipeline.convert.sources import WorkUnit, plan_units
from tokshard.pipeline.format.manifest import read_manifest
from tokshard.pipeline.sample_data import write_img2dataset_shards
from tokshard.pipeline.storage import REDACTED, redact_text, redact_url

# --------------------------------------------------------------------------- redact_url

UNCHANGED = [
    "",
    "/data/laion/00000.tar",
    "relative/dir",
    "./{00000..00009}.tar",
    "/weird/name?token=abc.tar",            # a local path has no query: `?` is part of its name
    "C:\\data\\x?sig=1.tar",
    "s3://bucket/laion/{00000..00099}.tar",
    "s3://bucket/prefix/*.parquet",
    "s3://bucket/key.tar?versionId=3HL4kqtJlcpXroDTDmJ",
    "gs://bucket/a/b.parquet",
    "hf://datasets/org/name/data/train-00000.parquet",
    "file:///data/x.tar",
    "https://example.com/data/00000.tar",
    "https://example.com:8443/data/00000.tar",
    "https://example.com/data/00000.tar?download=1&key=shard-1&x=",
    "https://example.com/a.tar?Expires=1700000000&X-Amz-Date=20240101T000000Z",   # no credential: kept
    "https://example.com/a.tar?token=&sig=",                                         # empty: nothing to hide
    "https://example.com/a.tar?token",                                               # no value at all
    "https://example.com/a.tar?part=1;v=2&x",
    "https://example.com/@scope/pkg/a.tar",                                          # `@` in the path
    "https://example.com/a.tar#section",
    "http://[::1]:8000/a.tar",
    "http://[2001:db8::1]/a.tar?part=2",
    "simplecache::https://example.com/a.tar",
    "tar://member.jpg::s3://bucket/a.tar",
]


@pytest.mark.parametrize("url", UNCHANGED)
def test_urls_without_credentials_are_unchanged_byte_for_byte(url):
    assert redact_url(url) == url


REDACTED_CASES = [
    # the brief's example
    ("http://user:secret@127.0.0.1:8000/00000.tar?X-Amz-Signature=abc&token=xyz",
     "http://REDACTED:REDACTED@127.0.0.1:8000/00000.tar?X-Amz-Signature=REDACTED&token=REDACTED"),
    # AWS SigV4 presigned: credential, signature, token, and the signing time go; the rest stays in order
    ("https://bucket.s3.us-east-1.amazonaws.com/laion/00000.tar?X-Amz-Algorithm=AWS4-HMAC-SHA256"
     "&X-Amz-Credential=AKIAIOSFODNN7EXAMPLE%2F20240101%2Fus-east-1%2Fs3%2Faws4_request"
     "&X-Amz-Date=20240101T000000Z&X-Amz-Expires=3600&X-Amz-Security-Token=IQoJb3JpZ2luX2VjEJr"
     "&X-Amz-SignedHeaders=host&X-Amz-Signature=fe5f80f77d5fa3beca038a248ff027d0445342fe2855ddc963176630326f1024",
     "https://bucket.s3.us-east-1.amazonaws.com/laion/00000.tar?X-Amz-Algorithm=AWS4-HMAC-SHA256"
     "&X-Amz-Credential=REDACTED&X-Amz-Date=REDACTED&X-Amz-Expires=REDACTED&X-Amz-Security-Token=REDACTED"
     "&X-Amz-SignedHeaders=host&X-Amz-Signature=REDACTED"),
    # AWS SigV2 / CloudFront
    ("https://b.s3.amazonaws.com/k.tar?AWSAccessKeyId=AKIAEXAMPLE&Expires=1700000000&Signature=vjbyPxybd%2BZ",
     "https://b.s3.amazonaws.com/k.tar?AWSAccessKeyId=REDACTED&Expires=REDACTED&Signature=REDACTED"),
    ("https://d111.cloudfront.net/a.tar?Expires=1700000000&Signature=abc~def__&Key-Pair-Id=K2JCJMDEHXQW5F",
     "https://d111.cloudfront.net/a.tar?Expires=REDACTED&Signature=REDACTED&Key-Pair-Id=K2JCJMDEHXQW5F"),
    # Google Cloud Storage V4 signed URL
    ("https://storage.googleapis.com/b/o.tar?X-Goog-Algorithm=GOOG4-RSA-SHA256&X-Goog-Credential=sa%40p.iam"
     "&X-Goog-Date=20240101T000000Z&X-Goog-Expires=900&X-Goog-SignedHeaders=host&X-Goog-Signature=0a1b2c",
     "https://storage.googleapis.com/b/o.tar?X-Goog-Algorithm=GOOG4-RSA-SHA256&X-Goog-Credential=REDACTED"
     "&X-Goog-Date=REDACTED&X-Goog-Expires=REDACTED&X-Goog-SignedHeaders=host&X-Goog-Signature=REDACTED"),
    # Azure SAS
    ("https://acct.blob.core.windows.net/c/a.tar?sv=2022-11-02&ss=b&srt=o&sp=r&se=2024-01-02T00:00:00Z"
     "&st=2024-01-01T00:00:00Z&spr=https&sig=k%2BzQ3%3D",
     "https://acct.blob.core.windows.net/c/a.tar?sv=2022-11-02&ss=b&srt=o&sp=r&se=REDACTED"
     "&st=REDACTED&spr=https&sig=REDACTED"),
    # names compare case-insensitively and percent-decoded; the name's own spelling is kept
    ("https://h/a.tar?x-amz-signature=s&TOKEN=t&Access_Token=u&X%2DAmz%2DCredential=c",
     "https://h/a.tar?x-amz-signature=REDACTED&TOKEN=REDACTED&Access_Token=REDACTED&X%2DAmz%2DCredential=REDACTED"),
    # `;` separates pairs too; a redacted value runs to the next `&`
    ("https://h/a.tar?part=1;token=t&x=2", "https://h/a.tar?part=1;token=REDACTED&x=2"),
    ("https://h/a.tar?token=a;b&x=2", "https://h/a.tar?token=REDACTED&x=2"),
    # every occurrence, and only the value
    ("https://h/a.tar?token=1&part=2&token=3", "https://h/a.tar?token=REDACTED&part=2&token=REDACTED"),
    ("https://h/a.tar?api_key=k&apikey=k2&password=p&client_secret=c&id_token=i&refresh_token=r&private_token=g",
     "https://h/a.tar?api_key=REDACTED&apikey=REDACTED&password=REDACTED&client_secret=REDACTED"
     "&id_token=REDACTED&refresh_token=REDACTED&private_token=REDACTED"),
    # user info, in any scheme, whatever the password holds
    ("https://user:pa%40ss@example.com/a.tar", "https://REDACTED:REDACTED@example.com/a.tar"),
    ("https://user:p@ss@example.com:8443/a.tar", "https://REDACTED:REDACTED@example.com:8443/a.tar"),
    ("https://ghp_token123@example.com/a.tar", "https://REDACTED@example.com/a.tar"),
    ("https://user:@example.com", "https://REDACTED:REDACTED@example.com"),
    ("ftp://anon:pw@ftp.example.com/pub/a.tar", "ftp://REDACTED:REDACTED@ftp.example.com/pub/a.tar"),
    ("s3://AKIAKEY:secretKey@bucket/a.tar", "s3://REDACTED:REDACTED@bucket/a.tar"),
    ("http://u:p@[::1]:8000/a.tar?sig=s#frag", "http://REDACTED:REDACTED@[::1]:8000/a.tar?sig=REDACTED#frag"),
    ("https://u:p@h?token=t", "https://REDACTED:REDACTED@h?token=REDACTED"),
    # fragment (OAuth implicit flow), and an fsspec chain
    ("https://h/a.tar#access_token=abc&state=1", "https://h/a.tar#access_token=REDACTED&state=1"),
    ("simplecache::https://u:p@h/a.tar?sig=s", "simplecache::https://REDACTED:REDACTED@h/a.tar?sig=REDACTED"),
    ("tar://m.jpg::https://h/a.tar?token=t", "tar://m.jpg::https://h/a.tar?token=REDACTED"),
    # a brace pattern with credentials
    ("https://h/{00000..00009}.tar?token=t", "https://h/{00000..00009}.tar?token=REDACTED"),
]


@pytest.mark.parametrize(("url", "expected"), REDACTED_CASES)
def test_credentials_are_redacted(url, expected):
    assert redact_url(url) == expected


@pytest.mark.parametrize("url", UNCHANGED + [u for u, _ in REDACTED_CASES])
def test_redaction_is_idempotent(url):
    once = redact_url(url)
    assert redact_url(once) == once


def test_a_url_signed_anew_redacts_the_same():
    def signed(date: str, signature: str) -> str:
        return (f"https://b.s3.amazonaws.com/00000.tar?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential="
                f"AKIA%2F{date[:8]}%2Fus-east-1%2Fs3%2Faws4_request&X-Amz-Date={date}&X-Amz-Expires=3600"
                f"&X-Amz-SignedHeaders=host&X-Amz-Signature={signature}")
    assert redact_url(signed("20240101T000000Z", "aaaa")) == redact_url(signed("20240301T120000Z", "bbbb"))
    # ... and another object does not
    assert redact_url(signed("20240101T000000Z", "aaaa")) != redact_url(
        signed("20240101T000000Z", "aaaa").replace("00000.tar", "00001.tar"))


def test_redact_text_finds_urls_and_query_strings_in_prose():
    text = ("FileNotFoundError: http://alice:pw123@h:80/x.tar?X-Amz-Signature=SIG1, then "
            "ClientResponseError(403, url='https://h/y?token=TOK2') and GET /z?sig=SIG3&part=1 "
            "(see https://h/w?Signature=SIG4). plain /local/path?token=ok s3://bucket/key")
    out = redact_text(text)
    for secret in ("alice", "pw123", "SIG1", "TOK2", "SIG3", "SIG4"):
        assert secret not in out
    assert out == ("FileNotFoundError: http://REDACTED:REDACTED@h:80/x.tar?X-Amz-Signature=REDACTED, then "
                   "ClientResponseError(403, url='https://h/y?token=REDACTED') and GET /z?sig=REDACTED&part=1 "
                   "(see https://h/w?Signature=REDACTED). plain /local/path?token=REDACTED s3://bucket/key")
    assert redact_text("nothing to see: /data/a.tar, s3://b/k.tar") == "nothing to see: /data/a.tar, s3://b/k.tar"


def test_job_identity_redacts_sources_and_keeps_plain_ones():
    plain = ["/data/a", "s3://bucket/{0..9}.tar", "https://h/a.tar?part=1"]
    cfg = ConvertConfig(sources=plain, out="/tmp/x")
    assert cfg.job_identity()["sources"] == plain
    assert cfg.sources == plain
    signed = ConvertConfig(sources=["https://u:p@h/a.tar?sig=s1"], out="/tmp/x")
    assert signed.job_identity()["sources"] == ["https://REDACTED:REDACTED@h/a.tar?sig=REDACTED"]
    assert signed.sources == ["https://u:p@h/a.tar?sig=s1"]          # the config keeps the real one
    resigned = ConvertConfig(sources=["https://u:p@h/a.tar?sig=s2"], out="/tmp/y")
    assert resigned.job_identity() == signed.job_identity()


def test_unit_spec_redacts_its_url():
    unit = WorkUnit(0, "wds", "https://u:p@h/a.tar?token=t")
    assert unit.url == "https://u:p@h/a.tar?token=t"
    assert unit.spec()["url"] == "https://REDACTED:REDACTED@h/a.tar?token=REDACTED"
    assert WorkUnit(0, "wds", "/data/a.tar").spec()["url"] == "/data/a.tar"


def test_failure_texts_are_redacted():
    url = "https://alice:pw123@h/00000.tar?X-Amz-Signature=SIG1&token=TOK2"
    error = describe(FileNotFoundError(url))
    assert error == "FileNotFoundError: https://REDACTED:REDACTED@h/00000.tar?X-Amz-Signature=REDACTED&token=REDACTED"
    policy = RetryPolicy(0)
    assert "SIG1" not in policy.failure(OSError(f"reading {url} failed"), 0).error
    unit = WorkUnit(3, "wds", url)
    for transient in (True, False):
        # an engine's UnitFailure may carry a raw message: the job's text is redacted whatever it holds
        msg = _failure_message([(unit, UnitFailure(f"OSError: {url}", 1, transient))], 4, 3)
        for secret in ("alice", "pw123", "SIG1", "TOK2"):
            assert secret not in msg
        assert "https://REDACTED:REDACTED@h/00000.tar?X-Amz-Signature=REDACTED&token=REDACTED" in msg


# --------------------------------------------------------------------------- end to end over HTTP

USER, PASSWORD = "alice-user-7f3a", "pw-Zq8xK2mN4vB6"
SIGNATURE, TOKEN = "sig-e1d2c3b4a5968778", "tok-9a8b7c6d5e4f3a2b"
CREDENTIAL, DATE = "AKIAQ5EXAMPLEKEY7", "20240101T000000Z"
SECRETS = (USER, PASSWORD, SIGNATURE, TOKEN, CREDENTIAL, DATE)


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Serves the folder only to requests with the right Basic auth and signature."""

    def _allowed(self) -> bool:
        auth = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        return self.headers.get("Authorization") == auth and f"X-Amz-Signature={SIGNATURE}" in self.path

    def do_GET(self) -> None:
        if self._allowed():
            super().do_GET()
        else:
            self.send_error(403)

    def do_HEAD(self) -> None:
        if self._allowed():
            super().do_HEAD()
        else:
            self.send_error(403)

    def log_message(self, *args: object) -> None:
        pass


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        pass        # a reader that stops early (a streamed tar's end) resets the connection


@pytest.fixture()
def http_tars(tmp_path):
    """(base URL of a local HTTP server holding img2dataset tars, their paths)."""
    pytest.importorskip("aiohttp")          # fsspec's HTTP filesystem
    tars = write_img2dataset_shards(tmp_path / "served", crops_per_photo=0, shard_size=8)
    handler = functools.partial(_Handler, directory=str(tmp_path / "served"))
    server = _Server(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}", tars
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def _signed(host: str, name: str, signature: str = SIGNATURE, date: str = DATE, token: str = TOKEN) -> str:
    return (f"http://{USER}:{PASSWORD}@{host}/{name}?X-Amz-Algorithm=AWS4-HMAC-SHA256"
            f"&X-Amz-Credential={CREDENTIAL}%2F20240101%2Fus-east-1%2Fs3%2Faws4_request&X-Amz-Date={date}"
            f"&X-Amz-Expires=3600&X-Amz-SignedHeaders=host&X-Amz-Signature={signature}&token={token}")


def _all_text(root: Path) -> dict[Path, bytes]:
    """Every file's bytes, and for Parquet files also every value decoded (their pages are
    compressed, so a secret in them would not show in the raw bytes)."""
    out = {}
    for p in sorted(root.rglob("*")):
        if not p.is_file():
            continue
        data = p.read_bytes()
        if p.suffix == ".parquet":
            pf = pq.ParquetFile(p)
            data += json.dumps(pf.read().to_pylist(), default=repr).encode()
            data += repr(pf.schema_arrow.metadata).encode() + repr(pf.metadata.metadata).encode()
        out[p] = data
    return out


def _assert_no_secrets(root: Path, complete: bool = True) -> None:
    files = _all_text(root)
    assert any(p.name == "job.json" for p in files)
    assert not complete or any(p.suffix == ".parquet" for p in files)
    for p, data in files.items():
        for secret in SECRETS:
            assert secret.encode() not in data, f"{secret} in {p.relative_to(root)}"


@pytest.mark.parametrize("fmt", ["parquet", "wds"])
def test_convert_from_presigned_http_urls_writes_no_secret(tmp_path, http_tars, tokenizer_dir, fmt):
    host, tars = http_tars
    urls = [_signed(host, t.name) for t in tars[:2]]
    out = tmp_path / "out"
    result = convert(convert_config(urls, out, tokenizer_dir, format=fmt, shard_size=4), quiet=True)
    record = result["dataset"]
    assert record["shards"] == 2 and record["totals"]["samples"] == 16 and not record["skipped_by_reason"]
    _assert_no_secrets(out)

    # What is written is the redacted URL, everywhere a source is named.
    redacted = [redact_url(u) for u in urls]
    assert all(f"X-Amz-Signature={REDACTED}&token={REDACTED}" in r and r.startswith("http://REDACTED:REDACTED@")
               for r in redacted)
    assert record["sources"] == redacted
    assert read_manifest(str(out))[1]["sources"] == redacted
    spec = json.loads((out / "_work" / "job.json").read_bytes())
    assert spec["config"]["sources"] == redacted
    manifest = pq.read_table(out / "manifest.parquet").to_pylist()
    assert [m["source_shards"] for m in manifest] == [[r] for r in redacted]
    index = pq.read_table(out / "samples").to_pylist()
    assert {r["source"] for r in index} == set(redacted)
    if fmt == "parquet":
        shard_sources = {s for p in (out / "shards").glob("*.parquet") for s in pq.read_table(p)["source"].to_pylist()}
        assert shard_sources == set(redacted)

    # Re-signed (new signature, date and token): the same job; every unit is reused.
    resigned = [_signed(host, t.name, signature=SIGNATURE, date="20240301T120000Z", token="tok-other")
                for t in tars[:2]]
    again = convert(convert_config(resigned, out, tokenizer_dir, format=fmt, shard_size=4), quiet=True)
    assert again["units_reused"] == 2 and again["dataset"]["job_hash"] == record["job_hash"]


def test_http_read_really_uses_the_credentials(tmp_path, http_tars, tokenizer_dir):
    """The server refuses a request without them: the redacted URL is never what is read."""
    host, tars = http_tars
    with pytest.raises(SourceError) as e:
        plan_units([redact_url(_signed(host, tars[0].name))], 8)
    assert "REDACTED" in str(e.value)
    with pytest.raises(SourceError) as e:
        plan_units([_signed(host, "missing.tar")], 8)
    for secret in SECRETS:
        assert secret not in str(e.value)


def test_a_failed_unit_names_its_source_redacted(tmp_path, http_tars, tokenizer_dir, monkeypatch):
    host, tars = http_tars
    url = _signed(host, tars[0].name)

    def unreachable(unit, *args, **kwargs):
        raise ConnectionResetError(f"connection reset while reading {unit.url}")

    monkeypatch.setattr(stages, "read_unit", unreachable)
    out = tmp_path / "out"
    with pytest.raises(JobError) as e:
        convert(convert_config([url], out, tokenizer_dir, retries=0), quiet=True)
    message = str(e.value)
    assert "shard 000000 from http://REDACTED:REDACTED@" in message and "ConnectionResetError" in message
    for secret in SECRETS:
        assert secret not in message
    _assert_no_secrets(out, complete=False)


def test_local_sources_are_recorded_as_given(tmp_path, photo_tars, tokenizer_dir):
    out = tmp_path / "out"
    record = convert(convert_config([photo_tars], out, tokenizer_dir), quiet=True)["dataset"]
    assert record["sources"] == [str(photo_tars)]
    sources = set(pq.read_table(out / "samples")["source"].to_pylist())
    assert sources == {str(p) for p in sorted(Path(photo_tars).glob("*.tar"))}
