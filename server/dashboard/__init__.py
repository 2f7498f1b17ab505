"""``edgefleet dashboard``: the operator's live web view of the fleet (docs/operations.md)."""
