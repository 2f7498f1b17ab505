"""The device's privacy: DP accounting (shared with the server's planning) and the
persisted privacy ledger that refuses to train past the budget."""
