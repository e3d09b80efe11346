"""CLI for the Class Relationship Graph (`dart crg mine`, `dart crg show`). Filled by the CRG work."""
