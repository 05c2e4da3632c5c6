"""Where logged traffic lives: a local path or an `s3://bucket/prefix` URI, through pyarrow.fs.

Every writer (`rta log --out`) and reader (training.logs, replay, `rta logs sql`, train) of the
logged layout resolves its location here, so a URI means the same thing everywhere:

* a path (anything without `scheme://`): the local file system, made absolute;
* `s3://bucket/prefix`: pyarrow's S3 client. Credentials come from the usual AWS chain
  (`AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` / `AWS_SESSION_TOKEN`, `~/.aws`, an instance
  role) and are never read or printed here; the endpoint from `RTA_S3_ENDPOINT`, else
  `AWS_ENDPOINT_URL_S3`, else `AWS_ENDPOINT_URL` (e.g. `http://127.0.0.1:8333` for a SeaweedFS
  or MinIO on loopback; no scheme means https); the region from `AWS_REGION` /
  `AWS_DEFAULT_REGION` (default us-east-1).

Object stores have no rename: the logger writes each file once under its final, unique key, and
an object becomes visible only when its upload completed (a killed multipart upload leaves no
object), so "readers see only whole files" holds there too (stream.logger.files).
"""

from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from stream.errors import ConfigError

S3 = "s3://"
ENDPOINT_VARS = ("RTA_S3_ENDPOINT", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")


def is_uri(location: str | Path) -> bool:
    """True for `scheme://...` (only s3:// is accepted by `resolve`)."""
    return "://" in str(location)


def join(location: str | Path, *parts: str) -> str | Path:
    """`location/part/...`, keeping a URI a string and a path a Path."""
    if is_uri(location):
        return "/".join([str(location).rstrip("/"), *parts])
    return Path(location).joinpath(*parts)


def s3_endpoint() -> tuple[str, str] | None:
    """(host:port, scheme) from the first endpoint variable that is set, else None (AWS)."""
    for var in ENDPOINT_VARS:
        value = os.environ.get(var, "").strip()
        if value:
            scheme, _, host = value.rpartition("://")
            scheme = scheme or "https"
            if scheme not in ("http", "https") or not host.strip("/") or "@" in host:
                # never echo the value: it may carry user:password
                raise ConfigError(f"{var}: expected http(s)://host:port (credentials come from the AWS "
                                  "environment, never from the endpoint)")
            return host.strip("/"), scheme
    return None


def s3_filesystem() -> Any:
    """An S3FileSystem for the environment's endpoint, region and credential chain."""
    from pyarrow import fs as pafs

    kwargs: dict[str, Any] = {"region": os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
                              or "us-east-1", "connect_timeout": 10.0, "request_timeout": 60.0}
    endpoint = s3_endpoint()
    if endpoint is not None:
        kwargs["endpoint_override"], kwargs["scheme"] = endpoint
    return pafs.S3FileSystem(**kwargs)


def check_uri(text: str) -> str:
    """`bucket/prefix` of an s3:// URI, or a one-line ConfigError. Checked before any request,
    so a malformed URI fails at once (not at the logger's first roll, minutes later), and a URI
    carrying credentials (`s3://KEY:SECRET@bucket`, pyarrow's own form) is refused without
    echoing it: no message, log line or state file may print a secret."""
    if not text.startswith(S3):
        scheme = text.split("://", 1)[0][:16]
        raise ConfigError(f"{scheme}://...: unsupported location (a local path or s3://bucket/prefix)")
    path = text[len(S3):].strip("/")
    bucket = path.split("/", 1)[0]
    if "@" in bucket or ":" in bucket:
        raise ConfigError("s3://...: credentials do not belong in the URI (use the AWS environment: "
                          "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, ~/.aws or a role)")
    if not path:
        raise ConfigError(f"{text}: no bucket (s3://bucket/prefix)")
    if any(part in ("", ".", "..") for part in path.split("/")):
        raise ConfigError(f"{text}: empty, '.' or '..' path component (s3://bucket/prefix)")
    if "?" in path or "#" in path:
        raise ConfigError(f"{text.split('?', 1)[0].split('#', 1)[0]}: no query or fragment (s3://bucket/prefix)")
    return path


def resolve(location: str | Path) -> tuple[Any, str]:
    """(pyarrow FileSystem, path inside it) for a path or an s3:// URI (validated: check_uri)."""
    from pyarrow import fs as pafs

    text = str(location)
    if not is_uri(text):
        return pafs.LocalFileSystem(), os.path.abspath(text)
    path = check_uri(text)
    return s3_filesystem(), path


def display(fs: Any, path: str) -> str:
    """How a file is named in messages: `s3://bucket/key` on S3, the path on disk."""
    return path if fs.type_name == "local" else S3 + path


@dataclass(frozen=True, order=True)
class RemoteFile:
    """A file on an object store, named like a Path where readers name files (`str()` is its
    URI; name, stem, suffix, parent) and carrying its file system for pyarrow's readers."""

    path: str  # bucket/key
    fs: Any = field(compare=False, repr=False)
    size: int | None = field(default=None, compare=False)

    def __str__(self) -> str:
        return S3 + self.path

    @property
    def name(self) -> str:
        return posixpath.basename(self.path)

    @property
    def stem(self) -> str:
        return posixpath.splitext(self.name)[0]

    @property
    def suffix(self) -> str:
        return posixpath.splitext(self.name)[1]

    @property
    def parent(self) -> str:
        return posixpath.dirname(self.path)


def list_files(location: str, recursive: bool = True) -> tuple[list[RemoteFile], set[str]]:
    """(files, directories) under an s3:// location (nothing when it does not exist). A
    multipart upload still in flight, or killed, is no object and so is never listed."""
    from pyarrow import fs as pafs

    fs, root = resolve(location)
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=recursive, allow_not_found=True))
    files = sorted(RemoteFile(i.path, fs, i.size) for i in infos if i.type == pafs.FileType.File)
    return files, {i.path for i in infos if i.type == pafs.FileType.Directory}


def kind_of(location: str) -> str:
    """"file", "dir" or "none" for an s3:// location."""
    from pyarrow import fs as pafs

    fs, root = resolve(location)
    t = fs.get_file_info(root).type
    return "file" if t == pafs.FileType.File else "dir" if t == pafs.FileType.Directory else "none"


class Location(click.ParamType):
    """A click type for `--logs` / `--out`: a path (as a Path) or an s3:// URI (as a string;
    click.Path would fold `s3://b` into `s3:/b`)."""

    name = "PATH|s3://BUCKET/PREFIX"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str | Path:
        if isinstance(value, Path) or not is_uri(value):
            return Path(value)
        try:
            check_uri(str(value))
        except ConfigError as exc:
            self.fail(str(exc), param, ctx)
        return str(value).rstrip("/")


LOCATION = Location()
