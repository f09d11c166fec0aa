"""Names of bnfold's ONNX functions (kept apart from ``function.py`` so that using them does not import onnxscript)."""

DOMAIN = "bnfold"
DOMAIN_VERSION = 1
TRAINING_FUNCTION = "BatchNormalizationTraining"
GRADIENT_FUNCTION = "BatchNormalizationTrainingGrad"
MEAN_FUNCTION = "BatchMean"
# Lowest default-domain opset the function bodies are valid at (multidirectional broadcasting arrived in 7).
MINIMUM_OPSET = 7
# ReduceMean-18 takes axes as an input.
REDUCE_MEAN_AXES_INPUT_OPSET = 18
