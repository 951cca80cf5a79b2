"""Serving: torch-free onnxruntime predictor, batch prediction, HTTP API."""
