"""Model registry, weight resolution and backends. Nothing here loads weights at import time."""
