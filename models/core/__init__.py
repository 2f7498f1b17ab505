"""Model-making without TensorFlow: the built-in tasks and their data, training,
calibration, evaluation, distillation, the cascade threshold and explanations."""
