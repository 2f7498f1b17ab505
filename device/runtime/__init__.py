"""The model package layer used by device, server and models alike: the manifest and
archive, their checks, the inference backends (onnxruntime, LiteRT), the verified
Predictor and the NumPy MLP that devices train."""
