"""One module per protocol, the single definition of its topics and payloads, used by
both ends: telemetry, scoring, updates, federated messages and serial frames."""
