"""Model updates on the device: the MQTT assignment listener, the TUF client, the
installer (sandboxed trial, A/B slots, rollback) and the ``edgefleet-agent update`` CLI."""
