"""The device side of edgefleet: inference runtime, sensor input, telemetry, updates.

This package is what a Raspberry Pi installs with ``edgefleet[device]``; nothing in it
imports TensorFlow.
"""
