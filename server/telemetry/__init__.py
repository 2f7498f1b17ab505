"""Telemetry on the server: ingest from MQTT, validation, the fleet store, alerts and
the fleet report."""
