"""Federated training on the server: the Flower ServerApp and strategies, the run
settings, the runner that drives a SuperLink, per-round storage and reports."""
