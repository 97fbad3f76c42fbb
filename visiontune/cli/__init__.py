"""The `visiontune` command: run the local stack, work with datasets, train and follow jobs, tune, serve.

One module per command group (docs/architecture.md §1); each adds its commands to the root group `cli`:
- `stack`    up, status, down, env: the local development stack
- `datasets` dataset push, dataset sample
- `jobs`     train, jobs list/get/watch/cancel, lr-find, recommend, weights seed
- `studies`  study create/watch/get/best/list/cancel/promote
- `serving`  deploy, undeploy, deployments, classify, feedback, metrics
- `specs`    spec defaults: the TrainingSpec reference from the protos' field rules
- `common`   what they share: the root group, --data-dir, channels to the services, errors -> exit codes
"""

from __future__ import annotations

# Imported for their side effect: each module's decorators register its commands on `cli`.
from visiontune.cli import datasets, jobs, serving, specs, stack, studies  # noqa: F401
from visiontune.cli.common import cli

__all__ = ["cli", "main"]


def main() -> None:
    """The console script `visiontune` (pyproject.toml)."""
    cli(prog_name="visiontune")
