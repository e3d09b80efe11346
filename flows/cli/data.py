"""CLI for the data plane (`dart shard`, `dart refresh`). Filled by the data-plane work."""
