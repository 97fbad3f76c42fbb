"""What a client may ask of the trainer: where its specs may read from, and how much one caller may queue.

A platform team sets these per deployment (flags or `VISIONTUNE_*` variables, the Kubernetes ConfigMap); each is
enforced with an error that names the limit and the setting that raises it:

- input locations: a spec's dataset and weights URIs must lie under them (`INVALID_ARGUMENT` on the field);
- images per job and bytes per dataset: checked by the worker once it has listed the data, before it downloads
  any (the job fails, naming the limit); the worker reads them from its environment (`DatasetLimits.to_env`);
- queued jobs and active studies per caller (the authenticated principal): `RESOURCE_EXHAUSTED` at creation.

0 disables a count limit.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from visiontune.uris import InputLocations

from trainer_service.jobs.records import CreatorQuota

# Defaults generous enough for real fine-tuning sets, small enough that one typo cannot fill a disk or a queue.
DEFAULT_MAX_IMAGES_PER_JOB: Final = 2_000_000
DEFAULT_MAX_DATASET_MB: Final = 200 * 1024  # 200 GiB
DEFAULT_MAX_QUEUED_JOBS_PER_CALLER: Final = 100
DEFAULT_MAX_ACTIVE_STUDIES_PER_CALLER: Final = 10

INPUT_LOCATIONS_ENV: Final = "VISIONTUNE_INPUT_LOCATIONS"
# The flags of the per-caller quotas: declared here, and named by the quota errors.
QUEUED_JOBS_FLAG: Final = "--max-queued-jobs-per-caller"
ACTIVE_STUDIES_FLAG: Final = "--max-active-studies-per-caller"


@dataclass(frozen=True)
class DatasetLimits:
    """How much data one job may read: images over all its splits, and bytes per dataset (one URI's folder)."""

    max_images_per_job: int = DEFAULT_MAX_IMAGES_PER_JOB
    max_dataset_mb: int = DEFAULT_MAX_DATASET_MB

    @staticmethod
    def env_name(field: str) -> str:
        return f"VISIONTUNE_{field.upper()}"

    def to_env(self) -> dict[str, str]:
        """The limits as the variables a worker reads them from (the trainer hands them to every worker)."""
        return {self.env_name(f.name): str(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> DatasetLimits:
        """What `to_env` wrote; a variable unset or empty takes the default. Raises ValueError for a non-integer."""
        environ = os.environ if environ is None else environ
        values = {}
        for f in dataclasses.fields(cls):
            raw = environ.get(cls.env_name(f.name), "").strip()
            if raw:
                try:
                    values[f.name] = int(raw)
                except ValueError:
                    raise ValueError(f"{cls.env_name(f.name)} must be an integer, got {raw!r}") from None
        return cls(**values)

    def images_problem(self, images: int) -> str | None:
        if self.max_images_per_job and images > self.max_images_per_job:
            return (
                f"the job's datasets hold {images} images, over the limit of {self.max_images_per_job} per job "
                f"(--max-images-per-job, {self.env_name('max_images_per_job')})"
            )
        return None

    def bytes_problem(self, uri: str, size: int) -> str | None:
        limit = self.max_dataset_mb * 1024 * 1024
        if self.max_dataset_mb and size > limit:
            return (
                f"dataset {uri} holds {size / 2**20:.0f} MiB of images, over the limit of {self.max_dataset_mb} MiB "
                f"per dataset (--max-dataset-mb, {self.env_name('max_dataset_mb')})"
            )
        return None


@dataclass(frozen=True)
class CallerQuotas:
    """What one caller (an authenticated principal; everyone together when authentication is off) may hold."""

    max_queued_jobs: int = DEFAULT_MAX_QUEUED_JOBS_PER_CALLER
    max_active_studies: int = DEFAULT_MAX_ACTIVE_STUDIES_PER_CALLER

    def job_quota(self) -> CreatorQuota:
        return CreatorQuota(self.max_queued_jobs, QUEUED_JOBS_FLAG)

    def study_quota(self) -> CreatorQuota:
        return CreatorQuota(self.max_active_studies, ACTIVE_STUDIES_FLAG)


@dataclass(frozen=True)
class TrainerPolicy:
    inputs: InputLocations
    dataset: DatasetLimits = DatasetLimits()
    quotas: CallerQuotas = CallerQuotas()

    @classmethod
    def default(cls, artifact_bucket: str) -> TrainerPolicy:
        return cls(InputLocations.default(artifact_bucket))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    env = DatasetLimits.from_env()
    group = parser.add_argument_group("limits (what clients may ask for)")
    group.add_argument(
        "--input-locations",
        default=os.environ.get(INPUT_LOCATIONS_ENV, ""),
        help="comma-separated s3://BUCKET/PREFIX/ or artifact-bucket prefixes that specs' dataset and weights URIs "
        f"must lie under; the service's own jobs/, models/, studies/ are never inputs (default: datasets/) "
        f"[{INPUT_LOCATIONS_ENV}]",
    )
    group.add_argument(
        "--max-images-per-job",
        type=int,
        default=env.max_images_per_job,
        help="images a job may read over all its splits; 0 = no limit "
        f"[{DatasetLimits.env_name('max_images_per_job')}]",
    )
    group.add_argument(
        "--max-dataset-mb",
        type=int,
        default=env.max_dataset_mb,
        help=f"MiB of images one dataset URI may hold; 0 = no limit [{DatasetLimits.env_name('max_dataset_mb')}]",
    )
    group.add_argument(
        QUEUED_JOBS_FLAG,
        type=int,
        default=int(os.environ.get("VISIONTUNE_MAX_QUEUED_JOBS_PER_CALLER") or DEFAULT_MAX_QUEUED_JOBS_PER_CALLER),
        help="jobs one caller may have queued at once; 0 = no limit [VISIONTUNE_MAX_QUEUED_JOBS_PER_CALLER]",
    )
    group.add_argument(
        ACTIVE_STUDIES_FLAG,
        type=int,
        default=int(
            os.environ.get("VISIONTUNE_MAX_ACTIVE_STUDIES_PER_CALLER") or DEFAULT_MAX_ACTIVE_STUDIES_PER_CALLER
        ),
        help="studies one caller may have running at once; 0 = no limit [VISIONTUNE_MAX_ACTIVE_STUDIES_PER_CALLER]",
    )


def policy_from_args(args: argparse.Namespace, *, artifact_bucket: str) -> TrainerPolicy:
    """The policy the flags ask for. Raises ValueError naming the flag for a malformed or negative value."""
    try:
        inputs = InputLocations.parse(args.input_locations, artifact_bucket=artifact_bucket)
    except ValueError as err:
        raise ValueError(f"--input-locations: {err}") from err
    counts = {
        "--max-images-per-job": args.max_images_per_job,
        "--max-dataset-mb": args.max_dataset_mb,
        QUEUED_JOBS_FLAG: args.max_queued_jobs_per_caller,
        ACTIVE_STUDIES_FLAG: args.max_active_studies_per_caller,
    }
    for flag, value in counts.items():
        if value < 0:
            raise ValueError(f"{flag} must be >= 0 (0 = no limit), got {value}")
    return TrainerPolicy(
        inputs=inputs,
        dataset=DatasetLimits(args.max_images_per_job, args.max_dataset_mb),
        quotas=CallerQuotas(args.max_queued_jobs_per_caller, args.max_active_studies_per_caller),
    )
