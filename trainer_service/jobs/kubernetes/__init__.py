"""The Kubernetes executor's runtime: every job attempt (and tuning trial) a batch/v1 Job (docs/architecture.md §6)."""
