"""Dataset and artifact locations: `s3://bucket/prefix` or a bare prefix in the artifact bucket."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class S3Location:
    bucket: str
    prefix: str  # no leading '/', a trailing '/' when it names a folder

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"


def parse_location(uri: str, *, default_bucket: str, folder: bool = True) -> S3Location:
    """`s3://b/p` -> (b, p/); `datasets/x` -> (default_bucket, datasets/x/). Raises ValueError."""
    if uri.startswith("s3://"):
        bucket, _, prefix = uri[len("s3://") :].partition("/")
        if not bucket:
            raise ValueError(f"{uri!r} names no bucket: expected s3://BUCKET/PREFIX")
    elif "://" in uri:
        raise ValueError(f"{uri!r}: only s3:// URIs and bare prefixes of the artifact bucket are supported")
    else:
        bucket, prefix = default_bucket, uri
    prefix = prefix.strip("/")
    if folder and prefix:
        prefix += "/"
    return S3Location(bucket, prefix)
