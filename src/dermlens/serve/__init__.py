"""Serving: the HTTP API and the web page (FastAPI); prediction itself is dermlens.infer."""
