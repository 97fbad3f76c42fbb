"""Training jobs: the job store, the executor that runs them, the worker process and what it publishes."""
