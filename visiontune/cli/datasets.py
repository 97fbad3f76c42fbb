"""`visiontune dataset push` and `dataset sample`: ImageFolder datasets into the bucket, and a synthetic one."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import click
from tqdm import tqdm

from visiontune.cli.common import cli, data_dir_option, s3_settings
from visiontune.devstack.dataset_upload import plan_upload, upload
from visiontune.devstack.sample_data import SHAPES, write_shapes_dataset
from visiontune.store import ArtifactStore, StoreError
from visiontune.uris import parse_location


@cli.group()
def dataset() -> None:
    """Upload and generate ImageFolder datasets."""


@dataset.command("push")
@click.argument("directory", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.argument("uri")
@click.option("--workers", type=click.IntRange(1, 32), default=4, show_default=True, help="Parallel uploads.")
@data_dir_option
def dataset_push(directory: Path, uri: str, workers: int, data_dir: Path) -> None:
    """Upload DIRECTORY/{label}/{image} to URI (s3://bucket/prefix, or a prefix such as datasets/NAME)."""
    settings = s3_settings(data_dir)
    try:
        location = parse_location(uri, default_bucket=settings.bucket)
        plan = plan_upload(directory, location.prefix)
    except ValueError as err:
        raise click.ClickException(str(err)) from err
    store = ArtifactStore.connect(dataclasses.replace(settings, bucket=location.bucket))
    try:
        store.ensure_bucket()
        with tqdm(total=plan.total_bytes, unit="B", unit_scale=True, desc=f"upload to {location}") as bar:

            def advance(nbytes: int) -> None:
                bar.update(nbytes)

            count = upload(store, plan, workers=workers, on_file=advance)
    except StoreError as err:
        raise click.ClickException(str(err)) from err
    labels = ", ".join(f"{k} ({v})" for k, v in sorted(plan.labels.items()))
    click.echo(f"uploaded {count} images in {len(plan.labels)} labels to {location}: {labels}")
    if plan.skipped:
        click.echo(f"skipped {len(plan.skipped)} files that are not images in label folders, e.g. {plan.skipped[0]}")


@dataset.command("sample")
@click.argument("directory", type=click.Path(path_type=Path, file_okay=False))
@click.option("--labels", type=click.IntRange(2, len(SHAPES)), default=3, show_default=True)
@click.option("--per-label", type=click.IntRange(1, 10000), default=40, show_default=True)
@click.option("--size", type=click.IntRange(16, 1024), default=64, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
def dataset_sample(directory: Path, labels: int, per_label: int, size: int, seed: int) -> None:
    """Write a synthetic ImageFolder of shapes (circle, square, …) to DIRECTORY."""
    files = write_shapes_dataset(directory, labels=SHAPES[:labels], per_label=per_label, size=size, seed=seed)
    click.echo(f"wrote {len(files)} images in {labels} labels to {directory}")
