"""Simulators and fault injectors for tests, benchmarks and the demo only: the sensor
simulator, serial faults, distribution shifts, tampered artifacts and the
built-in data shares of simulated devices. Nothing in production imports this package."""
