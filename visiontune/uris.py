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


# The prefixes the trainer writes to in its own bucket (trainer_service.jobs.artifacts, visiontune.names): never
# an input, whatever the settings allow — a spec reading them could train on another job's checkpoint or
# exfiltrate a model through its own metrics.
SERVICE_PREFIXES: tuple[str, ...] = ("jobs/", "models/", "deployments/", "studies/", "lr-finder/")

# Where inputs may come from when nothing is configured: the artifact bucket's datasets/ folder.
DEFAULT_INPUT_PREFIX = "datasets/"


@dataclass(frozen=True)
class InputLocations:
    """Where a spec's dataset and weights URIs may point: a closed list of `s3://bucket/prefix/` folders.

    `artifact_bucket` is the service's own bucket: bare prefixes in specs live there, and its `SERVICE_PREFIXES`
    stay off limits even when a configured location would cover them.
    """

    artifact_bucket: str
    allowed: tuple[S3Location, ...]

    @classmethod
    def parse(cls, values: str | list[str] | tuple[str, ...], *, artifact_bucket: str) -> InputLocations:
        """`datasets/,s3://shared/corpora/` (a comma-separated string or a list) as locations; an empty value
        means the default, `datasets/` of the artifact bucket. Raises ValueError for a malformed entry."""
        items = values.split(",") if isinstance(values, str) else list(values)
        entries = [item.strip() for item in items if item.strip()] or [DEFAULT_INPUT_PREFIX]
        allowed = []
        for entry in entries:
            location = parse_location(entry, default_bucket=artifact_bucket)
            if _has_dot_segments(location.prefix):
                raise ValueError(f"allowed input location {entry!r} has '.' or '..' segments")
            allowed.append(location)
        return cls(artifact_bucket, tuple(allowed))

    @classmethod
    def default(cls, artifact_bucket: str) -> InputLocations:
        return cls.parse("", artifact_bucket=artifact_bucket)

    def problem(self, location: S3Location) -> str | None:
        """Why a spec may not read `location` (an object key or a folder prefix); None when it may."""
        if _has_dot_segments(location.prefix):
            return "must not contain '.' or '..' path segments"
        if location.bucket == self.artifact_bucket:
            for own in SERVICE_PREFIXES:
                if location.prefix.startswith(own) or location.prefix == own.rstrip("/"):
                    return f"names the service's own {own} prefix, which is never an input"
        for allowed in self.allowed:
            if location.bucket == allowed.bucket and location.prefix.startswith(allowed.prefix):
                return None
        places = ", ".join(str(a) for a in self.allowed)
        return f"must lie under an allowed input location ({places}), got {location}"


def _has_dot_segments(prefix: str) -> bool:
    # S3 keys are not paths, but some servers and every filesystem cache normalise them: refuse what would.
    return any(segment in (".", "..") for segment in prefix.split("/")) or "//" in prefix
