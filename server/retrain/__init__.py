"""Drift-triggered retraining: the policy that decides and the actions that carry it out."""
