"""Prefect flows and the `dart` CLI: thin wrappers that pass paths to `dart_core`."""
