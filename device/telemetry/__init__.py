"""Device telemetry: the on-disk spool, the MQTT publisher that drains it, the periodic
reporter and its system statistics."""
