"""Drift monitoring of served predictions: reference outputs, statistical tests, HTML report."""
