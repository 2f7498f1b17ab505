"""Rollouts: the controller that assigns versions (canary, promote, rollback), its own
database ``rollouts.db`` (schema), the rows and protocols it shares (records), health
sources and their ledger (health), the fleet view over MQTT (fleet_view) and the guard
service that stops bad canaries (guard)."""
