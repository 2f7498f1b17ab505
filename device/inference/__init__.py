"""Serving on the device: the A/B serving view, the cascade to the cloud scorer, drift
statistics and the runtime benchmark."""
