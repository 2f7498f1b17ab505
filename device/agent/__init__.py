"""The device agent daemon (``edgefleet-agent``): configuration, enrollment, the local
API, supervision of the SuperNode, ``doctor`` and the run loop that ties the rest together."""
