"""A store a convert cannot use at all is one line and exit 2, never a traceback
(issue 14): a destination or source bucket that does not exist, credentials the
store rejects, an endpoint that does not answer. The server is a real one (moto's
S3 server on 127.0.0.1, with IAM checks switched on for the credential cases); the
client is the CLI, run as `python -m tokshard` in a subprocess."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import uuid

import pytest

SECRET = "wrong-secret-" + uuid.uuid4().hex  # must never be printed


def convert(sources: list[str], out: str, tokenizer_dir, options: dict, **env: str) -> subprocess.CompletedProcess:
    storage = [a for k, v in options.items() for a in ("--storage-opt", f"{k}={v}")]
    return subprocess.run(
        [sys.executable, "-m", "tokshard", "convert", *sources, "--out", out, *storage,
         "--tokenizer-opt", f"path={tokenizer_dir}", "--quiet"],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "AWS_EC2_METADATA_DISABLED": "true", **env})


def one_line_error(p: subprocess.CompletedProcess) -> str:
    """The one stderr line of a convert that failed as a usage/source error; asserts the shape."""
    assert "Traceback" not in p.stderr, p.stderr
    assert p.returncode == 2, p.stderr
    lines = p.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("tokshard: error: "), p.stderr
    assert SECRET not in p.stderr + p.stdout
    return lines[0]


def closed_port() -> int:
    """A port on 127.0.0.1 nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def s3_source(s3_bucket, photo_tars):
    """A bucket holding the photo tars under src/: (bucket, storage options)."""
    fs, bucket, options = s3_bucket
    fs.put(str(photo_tars) + "/", f"{bucket}/src/", recursive=True)
    return bucket, options


def missing_bucket() -> str:
    return "no-such-bucket-" + uuid.uuid4().hex[:12]


def test_a_destination_bucket_that_does_not_exist(s3_server, photo_tars, tokenizer_dir):
    out = f"s3://{missing_bucket()}/ds"
    line = one_line_error(convert([str(photo_tars)], out, tokenizer_dir, s3_server))
    assert line == f"tokshard: error: cannot use the destination {out}: the bucket does not exist"


@pytest.mark.parametrize("path", ["src", "src/00000.tar"], ids=["prefix", "object"])
def test_a_source_bucket_that_does_not_exist(s3_server, tokenizer_dir, tmp_path, path):
    src = f"s3://{missing_bucket()}/{path}"
    line = one_line_error(convert([src], str(tmp_path / "out"), tokenizer_dir, s3_server))
    assert line == f"tokshard: error: cannot read the input {src}: the bucket does not exist"
    assert not (tmp_path / "out").exists()      # nothing claimed before the input was planned


def test_a_glob_in_a_source_bucket_that_does_not_exist(s3_server, tokenizer_dir, tmp_path):
    src = f"s3://{missing_bucket()}/*.tar"
    line = one_line_error(convert([src], str(tmp_path / "out"), tokenizer_dir, s3_server))
    assert src in line


ALLOW_S3 = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}


@pytest.fixture()
def rejected_credentials(s3_source):
    """Moto's IAM checks on (by default it accepts any credentials); yields
    {what is wrong: (access key id, secret)} for credentials it now rejects."""
    import boto3
    import s3fs
    from moto.core.authorization import enable_iam_authentication
    bucket, options = s3_source
    iam = boto3.client("iam", endpoint_url=options["endpoint_url"], region_name="us-east-1",
                       aws_access_key_id=options["key"], aws_secret_access_key=options["secret"])

    def user(policy: dict | None) -> tuple[str, str]:
        name = "user-" + uuid.uuid4().hex[:8]
        iam.create_user(UserName=name)
        if policy:
            iam.put_user_policy(UserName=name, PolicyName="s3", PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName=name)["AccessKey"]
        return key["AccessKeyId"], key["SecretAccessKey"]

    allowed, powerless = user(ALLOW_S3), user(None)
    with enable_iam_authentication():
        # The control: with checks on, the allowed user's own key and secret still get in, so
        # what the cases below meet is the check of their credentials. (A HEAD: moto 5.2 also
        # rejects a ListObjectsV2 signed with the right secret, so a whole convert with good
        # credentials cannot run with its checks on. The requests the cases below fail on
        # first are a HEAD or GET of an object, whose signatures it checks correctly.)
        fs = s3fs.S3FileSystem(endpoint_url=options["endpoint_url"], key=allowed[0], secret=allowed[1],
                               skip_instance_cache=True)
        assert fs.info(f"{bucket}/src/00000.tar")["size"] > 0
        wrong = s3fs.S3FileSystem(endpoint_url=options["endpoint_url"], key=allowed[0], secret=SECRET,
                                  skip_instance_cache=True)
        with pytest.raises(PermissionError):
            wrong.info(f"{bucket}/src/00000.tar")
        yield {"unknown-key": ("AKIA" + uuid.uuid4().hex[:16].upper(), SECRET),
               "wrong-secret": (allowed[0], SECRET),
               "no-permission": powerless}


@pytest.mark.parametrize("side", ["destination", "source"])
@pytest.mark.parametrize("wrong", ["unknown-key", "wrong-secret", "no-permission"])
def test_credentials_the_store_rejects(s3_source, rejected_credentials, photo_tars, tokenizer_dir, tmp_path,
                                       side, wrong):
    bucket, options = s3_source
    key, secret = rejected_credentials[wrong]
    options = {**options, "key": key, "secret": secret}
    if side == "destination":
        url = f"s3://{bucket}/ds"
        line = one_line_error(convert([str(photo_tars)], url, tokenizer_dir, options))
        assert line.startswith(f"tokshard: error: cannot use the destination {url}: access denied (")
    else:
        url = f"s3://{bucket}/src"
        line = one_line_error(convert([url], str(tmp_path / "out"), tokenizer_dir, options))
        assert line.startswith(f"tokshard: error: cannot read the input {url}: access denied (")
    assert line.endswith("; check the credentials and their permissions")


@pytest.mark.parametrize("side", ["destination", "source", "source-bucket"])
def test_an_endpoint_that_does_not_answer(photo_tars, tokenizer_dir, tmp_path, side):
    port = closed_port()
    options = {"endpoint_url": f"http://127.0.0.1:{port}", "key": "testing", "secret": SECRET}
    # botocore retries a connection it cannot open (legacy mode: 5 attempts, with backoff);
    # one attempt keeps the test fast. s3fs itself does not retry it.
    fast = {"AWS_MAX_ATTEMPTS": "1", "AWS_RETRY_MODE": "standard"}
    if side == "destination":
        url = "s3://bucket/ds"
        line = one_line_error(convert([str(photo_tars)], url, tokenizer_dir, options, **fast))
        what = "cannot use the destination"
    else:
        url = "s3://bucket/src" if side == "source" else "s3://bucket"
        line = one_line_error(convert([url], str(tmp_path / "out"), tokenizer_dir, options, **fast))
        what = "cannot read the input"
    assert line.startswith(f"tokshard: error: {what} {url}: cannot connect to the endpoint (")
    assert f"127.0.0.1:{port}" in line


def test_an_unreachable_presigned_url_is_named_without_its_signature(tokenizer_dir, tmp_path):
    url = (f"http://127.0.0.1:{closed_port()}/bucket/00000.tar"
           f"?X-Amz-Credential=AKIAEXAMPLE&X-Amz-Signature={SECRET}")
    line = one_line_error(convert([url], str(tmp_path / "out"), tokenizer_dir, {}))
    redacted = url.replace("AKIAEXAMPLE", "REDACTED").replace(SECRET, "REDACTED")
    assert line.startswith(f"tokshard: error: cannot read the input {redacted}: cannot connect to the endpoint (")


def test_a_store_that_works_still_converts(s3_source, tokenizer_dir):
    """The guards change nothing when the store answers: S3 in, S3 out, exit 0."""
    bucket, options = s3_source
    p = convert([f"s3://{bucket}/src"], f"s3://{bucket}/ds", tokenizer_dir, options)
    assert p.returncode == 0, p.stderr
    assert "converted 19 images" in p.stdout
