"""Sensor input on the device: the serial reader (pyserial, reconnecting) and the
feature extraction that turns windows into model inputs."""
