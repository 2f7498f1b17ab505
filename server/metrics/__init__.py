"""Prometheus metrics of the fleet's services (``/metrics``) and of the fleet itself."""
