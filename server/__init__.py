"""The server side of edgefleet: federated runs, registry, cloud scorer, ingest, CLI."""
