"""Atomic, fsspec-backed file writes: a reader never sees a partial file. And
`redact_url`: credentials in a source URL never reach a file. And
`read_parquet_bytes`: every Parquet file read back as bytes goes to Arrow through it.
And `storage_access`: a store that cannot be used at all (no such bucket, access
denied, no endpoint) is one typed error naming it, not a traceback."""

from __future__ import annotations

import errno
import hashlib
import os
import re
import socket
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
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


_THREADED_READ = 16 * 2**20     # bytes


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
    if filters is not None:
        return pq.read_table(pa.BufferReader(buf), columns=columns, filters=filters)
    # Without filters, the file reader itself: ~3x faster than read_table on the small files
    # a sample index or label table is (no dataset machinery). It ignores a column it does not
    # have, where read_table refuses one: refused here the same way.
    reader = pq.ParquetFile(pa.BufferReader(buf))
    if columns is not None:
        missing = [c for c in columns if c not in reader.schema_arrow.names]
        if missing:
            raise pa.ArrowInvalid(f"No match for column(s) {missing} in the Parquet file")
    # Arrow's thread pool only for large files: on a shard-sized one its handoffs cost more
    # than they save (a 1,159-row token shard: 0.55 ms of CPU with threads, 0.37 without),
    # and loader workers and decode workers read in parallel already.
    return reader.read(columns=columns, use_threads=len(data) > _THREADED_READ)


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


# -- a store that cannot be used at all ------------------------------------------------------

# What an OSError's errno says when the endpoint is not there (aiohttp's ClientConnectorError,
# for http(s) sources, is an OSError that carries one).
_UNREACHABLE = frozenset({errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EHOSTDOWN})


def _botocore_errors() -> tuple[tuple[type[BaseException], ...], tuple[type[BaseException], ...]]:
    """(cannot connect, no usable credentials): botocore's exceptions for them (s3fs raises
    them untranslated); none when botocore is not installed (no s3fs)."""
    try:
        from botocore import exceptions as b
    except ImportError:
        return (), ()
    return (b.ConnectionError,), (b.NoCredentialsError, b.PartialCredentialsError, b.CredentialRetrievalError)


def _error_code(error: BaseException) -> str | None:
    """The S3 error code (`NoSuchBucket`, `AccessDenied`, ...) behind an fsspec error: s3fs
    raises a Python error (FileNotFoundError, PermissionError) whose cause is botocore's."""
    seen: BaseException | None = error
    while seen is not None:
        response = getattr(seen, "response", None)
        if isinstance(response, dict) and isinstance(response.get("Error"), dict):
            code = response["Error"].get("Code")
            if code:
                return str(code)
        seen = seen.__cause__
    return None


def _one_line(error: BaseException, limit: int = 300) -> str:
    text = " ".join(str(error).split())
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return redact_text(text) or type(error).__name__


def _http_status(error: BaseException) -> int | None:
    """The HTTP status of an aiohttp response error (fsspec's HTTP filesystem), if it is one."""
    status = getattr(error, "status", None)
    return status if type(error).__module__.startswith("aiohttp") and isinstance(status, int) else None


def access_failure(error: BaseException | None, _depth: int = 0) -> str | None:
    """What is wrong, in one line, when `error` says that a store cannot be used at all: its
    bucket does not exist, access is denied (wrong or missing credentials, no permission), or
    its endpoint cannot be reached. None for any other error, which is left to its caller
    (a missing object, a transient failure, a bug)."""
    if error is None or _depth > 8:
        return None
    connect, credentials = _botocore_errors()
    if isinstance(error, FileNotFoundError):
        # gcsfs and adlfs carry no S3 code, but say so (a local error names its file instead).
        if _error_code(error) == "NoSuchBucket" or (error.filename is None
                                                   and "bucket does not exist" in str(error).lower()):
            return "the bucket does not exist"
        # fsspec's HTTP filesystem reports every failure to look at a URL as FileNotFoundError,
        # caused by what really happened.
        return access_failure(error.__cause__, _depth + 1)
    if isinstance(error, PermissionError) or _http_status(error) in (401, 403):
        return f"access denied ({_one_line(error)}); check the credentials and their permissions"
    if credentials and isinstance(error, credentials):
        return f"no usable credentials ({_one_line(error)})"
    if ((connect and isinstance(error, connect)) or isinstance(error, (ConnectionRefusedError, socket.gaierror))
            or (isinstance(error, OSError) and error.errno in _UNREACHABLE)):
        return f"cannot connect to the endpoint ({_one_line(error)})"
    return None


@contextmanager
def storage_access(url: str, what: str, error: Callable[[str], Exception]) -> Iterator[None]:
    """Run the block that first reads or writes `url`; if the store cannot be used at all
    (`access_failure`), raise `error("{what} {url}: {the cause}")` instead, one line, with
    the URL redacted. Every other exception passes through unchanged: this guards a job's
    first look at its input and destination, not the retried work that follows."""
    try:
        yield
    except Exception as e:
        cause = access_failure(e)
        if cause is None:
            raise
        raise error(f"{what} {redact_url(url)}: {cause}") from None
