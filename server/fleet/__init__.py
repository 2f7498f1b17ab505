"""The fleet itself: the fleet home, enrolled devices, enrollment bundles, the broker
(password file, ACL), signing keys, the PKI and the audit log."""
