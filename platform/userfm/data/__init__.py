"""Data: the canonical event schema, row validation, converters from public formats, the Ray Data ingest,
per-user sequences and the synthetic multi-service generator."""
