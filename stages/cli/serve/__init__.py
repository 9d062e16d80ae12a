"""qlora-serve: the HTTP API (app), its batcher and its Prometheus metrics."""
