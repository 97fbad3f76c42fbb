"""`visiontune spec defaults`: the TrainingSpec reference as YAML, every field at its default with its range.

The text comes from the field rules in protos/ (`specfile.spec_reference_yaml`), so it follows any change of a
default or range there; docs/spec.md is the same reference in Markdown.
"""

from __future__ import annotations

from pathlib import Path

import click

from visiontune.cli.common import cli
from visiontune.specfile import spec_reference_yaml


@cli.group()
def spec() -> None:
    """Training spec files: every field with its default and allowed range."""


@spec.command("defaults")
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Write the reference to this file instead of standard output.",
)
def defaults(output: Path | None) -> None:
    """Print every TrainingSpec field at its default, with its range: a starting point for a spec file."""
    text = spec_reference_yaml()
    if output is None:
        click.echo(text, nl=False)
        return
    output.write_text(text, encoding="utf-8")
    click.echo(f"wrote {output} (set dataset.uri, keep only the fields you change)")
