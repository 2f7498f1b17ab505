"""Model definitions, training, calibration, int8 quantization and export.

Importing this package is cheap: TensorFlow is imported only by the TFLite export,
and only when it is called.
"""
