"""The local development stack: an S3 server process, throwaway service launchers, sample data and its upload.

Client side only (docs/architecture.md §1): the CLI and the tests import it; no service does.
"""
