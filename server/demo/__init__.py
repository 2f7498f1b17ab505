"""``edgefleet demo``: a whole fleet on this machine as real processes, including
emulated arm64 devices."""
