"""Prefect flows and the `dart` CLI: thin wrappers that pass paths to `dart_core`."""
import os

# The pipeline runs offline (and must never phone home from a customer's network).
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
