"""The prediction store: every inference replica's predictions and feedback in one SQL database (store.py), with
its own tables and migrations (schema.py)."""
