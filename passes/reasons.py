"""Why a BatchNormalization was left in the graph: every "no" of every rule is exactly one member here."""

from __future__ import annotations

import enum


class SkipReason(str, enum.Enum):
    """Named reasons for leaving a BatchNormalization node untouched (the value is the member's name)."""

    TRAINING_MODE = "TRAINING_MODE"
    """Training-mode BN (opset>=14 training_mode=1, opset<=9 with more than one output, opset<=6 is_test=0):
    it normalises with batch statistics, which are not constants."""
    SPATIAL_ZERO = "SPATIAL_ZERO"
    """Legacy ``spatial=0`` (per-activation statistics, opset<=8): the affine is not per channel."""
    BN_PARAMS_NOT_CONSTANT = "BN_PARAMS_NOT_CONSTANT"
    """scale, B, mean or var is computed at run time or is a graph input."""
    PARAM_SHAPE_MISMATCH = "PARAM_SHAPE_MISMATCH"
    """The BN parameters are not 1-D of one length, or that length differs from the producer's channels."""
    NO_PRODUCER = "NO_PRODUCER"
    """The BN's input is a graph input or an initializer: no layer to fold into."""
    UNSUPPORTED_PRODUCER = "UNSUPPORTED_PRODUCER"
    """The BN's input comes from an op no rule folds into (an activation, Concat, Add, ...)."""
    RULE_DISABLED = "RULE_DISABLED"
    """A rule exists for the producer but was disabled with ``only``/``skip``."""
    PRODUCER_OUTPUT_SHARED = "PRODUCER_OUTPUT_SHARED"
    """The producer's output is read by other nodes too: folding would change what they see."""
    PRODUCER_OUTPUT_IS_GRAPH_OUTPUT = "PRODUCER_OUTPUT_IS_GRAPH_OUTPUT"
    """The producer's output is itself a graph output, which must keep its value."""
    WEIGHT_NOT_CONSTANT = "WEIGHT_NOT_CONSTANT"
    """The producer's weight is a runtime input or computed at run time."""
    BIAS_NOT_CONSTANT = "BIAS_NOT_CONSTANT"
    """The producer's bias is a runtime input or computed at run time."""
    UNSUPPORTED_DTYPE = "UNSUPPORTED_DTYPE"
    """The weight is not fp16, bf16, fp32 or fp64."""
    UNSUPPORTED_LAYOUT = "UNSUPPORTED_LAYOUT"
    """The producer's weight layout or attributes do not allow a per-output-channel fold."""
    FOLDED_WEIGHTS_NOT_FINITE = "FOLDED_WEIGHTS_NOT_FINITE"
    """The folded weights or bias would contain NaN or Inf (for example var + epsilon <= 0)."""
    FOLDED_WEIGHTS_OVERFLOW = "FOLDED_WEIGHTS_OVERFLOW"
    """A folded value exceeds the largest finite value of the weight dtype (fp16: 65504)."""
    CHANNEL_AXIS_NOT_WEIGHT_AXIS = "CHANNEL_AXIS_NOT_WEIGHT_AXIS"
    """BN normalises axis 1, but the producer's weight maps to another output axis (MatMul with an output of
    rank > 2 maps its weight to the last axis): folding would scale the wrong axis."""
    RANK_UNKNOWN = "RANK_UNKNOWN"
    """The rank of the tensor is needed to place the per-channel affine, but neither the model records it nor
    ONNX shape inference can tell it."""
    ADDED_CONSTANT_NOT_PER_CHANNEL = "ADDED_CONSTANT_NOT_PER_CHANNEL"
    """In ``producer → Add(constant) → BN`` the constant varies along an axis other than the channel axis (or
    widens the tensor), so it cannot move into a per-channel bias."""
    CONV_HAS_PADDING = "CONV_HAS_PADDING"
    """Forward fold into the following Conv: the Conv pads its input (pads != 0 or ``SAME_*`` with a kernel
    wider than 1), and padded border pixels would see the BN shift that the original never added."""
    ATTRIBUTE_IS_REFERENCE = "ATTRIBUTE_IS_REFERENCE"
    """Inside a function body an attribute of the BN or its neighbour refers to a function attribute, whose value
    is only known per call site."""
    NEIGHBOUR_IN_OTHER_GRAPH = "NEIGHBOUR_IN_OTHER_GRAPH"
    """The producer (or forward consumer) lives in another graph than the BN (an outer scope or a subgraph)."""

    FUNCTION_OPSET_DIFFERS = "FUNCTION_OPSET_DIFFERS"
    """A function body imports another default opset than the model, one where ``Constant`` has a different
    schema: the folded tensors (Constant nodes in a function) would make the model invalid."""

    def __str__(self) -> str:
        return self.value


class Skip(Exception):
    """Raised by a rule or a precondition check: leave this BN untouched for ``reason``."""

    def __init__(self, reason: SkipReason, detail: str) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail
