"""Atomic, fsspec-backed file writes: a reader never sees a partial file. And
`redact_url`: credentials in a source URL never reach a file. And
`read_parquet_bytes`: every Parquet file read back as bytes goes to Arrow through it."""

from __future__ import annotations

import hashlib
import os
import re
import uuid
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote_plus

import fsspec
from fsspec.implementations.local import LocalFileSystem

if TYPE_CHECKING:
    import pyarrow as pa

TMP_MARK = ".tmp-"


def filesystem(url: str, storage_options: dict[str, Any] | None = None) -> tuple[Any, str]:
    return fsspec.core.url_to_fs(url, **(storage_options or {}))


def join(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *parts])


def atomic_write(fs: Any, path: str, data: bytes) -> None:
    """Write `data` to `path` so that it appears whole or not at all."""
    if isinstance(fs, LocalFileSystem):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = f"{os.path.dirname(path)}/{TMP_MARK}{uuid.uuid4().hex}-{os.path.basename(path)}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    else:
        # Object stores publish an object only when its upload completes.
        fs.pipe_file(path, data)


def read_parquet_bytes(data: bytes, columns: list[str] | None = None,
                       filters: list[tuple[str, str, Any]] | None = None) -> pa.Table:
    """The Parquet file `data` (bytes, as `fs.cat_file` returns them) as a table.

    Arrow reads a copy of `data` in memory it owns, never the Python object itself.
    `pq.read_table` scans through pyarrow.dataset, whose tasks finish on Arrow's thread
    pool: one of them can drop the last reference to the input after read_table has
    returned. When that input is Python memory (`pa.BufferReader(bytes)`, like a Python
    file object before it), dropping it takes the GIL; once the interpreter is
    finalizing, CPython ends a thread that asks for the GIL with pthread_exit, whose
    unwinding through Arrow's noexcept destructors calls std::terminate: "terminate
    called without an active exception", exit 134, a few runs in a hundred. Memory Arrow
    owns is freed without the GIL, on any thread, at any time.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq
    buf = pa.allocate_buffer(len(data))
    memoryview(buf).cast("B")[:] = data
    return pq.read_table(pa.BufferReader(buf), columns=columns, filters=filters)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def clean_temporaries(fs: Any, root: str) -> int:
    """Remove temp files a killed run left behind; returns how many."""
    if not fs.exists(root):
        return 0
    stale = [p for p in fs.find(root) if os.path.basename(p).startswith(TMP_MARK)]
    for p in stale:
        fs.rm_file(p)
    return len(stale)


REDACTED = "REDACTED"

# Query (or fragment) parameters whose values are credentials, compared case-insensitively
# after percent-decoding: presigned AWS S3 (SigV4 and SigV2/CloudFront), Google Cloud Storage
# signed URLs (V4 and V2), Azure SAS, and the usual bearer-token / API-key names.
# Not `key`: in many URLs it names the object (s3-style listings, `?key=shard1.tar`), and two
# sources that differ only in it must keep different job hashes.
SECRET_PARAMS = frozenset({
    "x-amz-credential", "x-amz-signature", "x-amz-security-token",     # AWS SigV4
    "awsaccesskeyid", "signature",                                     # AWS SigV2, CloudFront
    "x-goog-credential", "x-goog-signature", "googleaccessid",         # GCS V4, V2
    "sig",                                                             # Azure SAS
    "token", "access_token", "id_token", "refresh_token", "private_token",
    "api_key", "apikey", "client_secret", "password", "secret",
})
# The signing time and lifetime: not secret, but new each time a URL is (re-)signed. They are
# redacted only in a URL that carries a credential above, so that a re-signed presigned URL
# redacts (and hashes) the same and resuming a job with fresh URLs finds its committed units.
SIGNING_PARAMS = frozenset({
    "x-amz-date", "x-amz-expires", "expires",                          # AWS SigV4, SigV2, CloudFront
    "x-goog-date", "x-goog-expires",                                   # GCS
    "st", "se", "skt", "ske",                                          # Azure SAS start/expiry
})

_SCHEME = r"[A-Za-z][A-Za-z0-9+.-]*://"
_URL_START = re.compile(_SCHEME)
# fsspec chains URLs with "::" (simplecache::https://..., tar://member::https://...); an IPv6
# host ([::1]) is no chain, since no scheme follows its "::".
_CHAIN = re.compile(r"::(?=" + _SCHEME + ")")
# A URL in prose ends at a space or quote; punctuation after it is the sentence's.
_URL_IN_TEXT = re.compile(_SCHEME + r"""[^\s'"<>`]+?(?=[.,;:!)\]}]*(?:[\s'"<>`]|$))""")
_PARAM_IN_TEXT = re.compile(r"""(?<=[?&;#])([A-Za-z0-9_.%-]+)=([^&\s'"<>`#;]+?)(?=[.,:!)\]}]*(?:[&\s'"<>`#;]|$))""")


def redact_url(url: str) -> str:
    """`url` with the credentials it carries replaced by REDACTED, so it can be written down.

    - user info: `https://user:password@host/...` -> `https://REDACTED:REDACTED@host/...`
      (`https://token@host` -> `https://REDACTED@host`), in any scheme;
    - the non-empty values of the query and fragment parameters in SECRET_PARAMS
      (`?X-Amz-Signature=...&token=...`), and, in a URL that has one, those of SIGNING_PARAMS;
      names, order and every other parameter are kept as they are.

    Anything else, local paths (which have no query) included, comes back byte for byte
    unchanged, and redact_url(redact_url(u)) == redact_url(u). Parts of an fsspec chain
    (`a::b`) are redacted each. A password must be percent-encoded as RFC 3986 asks (a raw
    `/`, `?` or `#` in it ends the host part, which neither fsspec nor aiohttp can open).
    """
    if "://" not in url:
        return url
    return "::".join(_redact_one(part) for part in _CHAIN.split(url))


def _redact_one(url: str) -> str:
    m = _URL_START.match(url)
    if m is None:
        return url
    head, rest = url[: m.end()], url[m.end():]
    end = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    authority, tail = rest[:end], rest[end:]
    if "@" in authority:
        userinfo, _, host = authority.rpartition("@")
        authority = ":".join(REDACTED for _ in userinfo.split(":", 1)) + "@" + host
    path, q, query = tail.partition("?")
    if q:
        query, h, fragment = query.partition("#")
    else:
        path, h, fragment = path.partition("#")
    if _redact_params(query, SECRET_PARAMS)[1] or _redact_params(fragment, SECRET_PARAMS)[1]:
        query = _redact_params(query, SECRET_PARAMS | SIGNING_PARAMS)[0]
        fragment = _redact_params(fragment, SECRET_PARAMS | SIGNING_PARAMS)[0]
    return head + authority + path + q + query + h + fragment


def _redact_params(params: str, names: frozenset[str], sep: str = "&") -> tuple[str, bool]:
    """`params` (`a=1&b=2`) with the non-empty values of `names` redacted; and whether any was.
    A `;` inside a pair that is not itself redacted separates pairs too (`a=1;token=x`)."""
    out, hit = [], False
    for param in params.split(sep):
        name, eq, value = param.partition("=")
        if eq and value and unquote_plus(name).strip().lower() in names:
            param, hit = f"{name}={REDACTED}", True
        elif sep == "&" and ";" in param:
            param, sub = _redact_params(param, names, ";")
            hit = hit or sub
        out.append(param)
    return sep.join(out), hit


def redact_text(text: str) -> str:
    """`text` (an error message) with every URL in it put through redact_url, and any other
    `name=value` of a SECRET_PARAMS name that follows `?`, `&`, `;` or `#` redacted too (a
    query string quoted without its URL)."""
    text = _URL_IN_TEXT.sub(lambda m: redact_url(m.group(0)), text)
    return _PARAM_IN_TEXT.sub(
        lambda m: f"{m.group(1)}={REDACTED}" if unquote_plus(m.group(1)).lower() in SECRET_PARAMS else m.group(0),
        text)
