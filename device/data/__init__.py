"""The device's own data: the local sample store (labelled model inputs) and the label
intake that decides what may enter it."""
