"""The base layer both sides import: errors, configuration, durable files, retry, metrics,
the one MQTT link and CLI support. It imports nothing else of edgefleet."""
