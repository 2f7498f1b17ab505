"""Federated learning on the device: the Flower ClientApp, DP-SGD and its data caches."""
