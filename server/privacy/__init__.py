"""Empirical privacy: the one-run canary audit (``edgefleet privacy audit``).

Like :mod:`edgefleet.server.demo`, it runs simulated devices (``models.sim``).
"""
