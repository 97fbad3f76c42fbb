"""The local development stack: an S3 server process, throwaway service launchers, sample data."""
