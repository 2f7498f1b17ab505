"""Rollouts: the controller that assigns versions (canary, promote, rollback), its
database, the fleet view over MQTT and the guard service that stops bad canaries."""
