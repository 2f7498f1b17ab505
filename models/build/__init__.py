"""The build pipeline: ONNX and TFLite export, int8 quantization, the cloud ensemble and
packaging. TensorFlow is imported only here."""
