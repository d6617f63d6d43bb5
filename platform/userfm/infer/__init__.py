"""Inference: frozen embedding tables from an exported encoder (``embed``) and their refresh on new logs."""
