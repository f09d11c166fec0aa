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
    """scale, B, mean or var is computed at run time (by an op the constant evaluator does not evaluate) or is a
    runtime graph input."""
    BN_PARAMS_ARE_GRAPH_INPUTS = "BN_PARAMS_ARE_GRAPH_INPUTS"
    """scale, B, mean or var is an initializer also listed as a graph input (IR >= 4, old exporters'
    ``keep_initializers_as_inputs``): only a default the caller may override at run time. The detail names the
    inputs; ``freeze_initializer_inputs`` (CLI ``--freeze-initializer-inputs``) makes them constants first."""
    PARAM_SHAPE_MISMATCH = "PARAM_SHAPE_MISMATCH"
    """The BN parameters are not 1-D of one length, or that length differs from the producer's channels."""
    NO_PRODUCER = "NO_PRODUCER"
    """The BN's input is a graph input or an initializer: no layer to fold into."""
    UNSUPPORTED_PRODUCER = "UNSUPPORTED_PRODUCER"
    """The BN's input comes from an op no rule folds into (an activation, an Add of two runtime values, ...)."""
    RULE_DISABLED = "RULE_DISABLED"
    """A rule exists for the producer but was disabled with ``only``/``skip``."""
    PRODUCER_OUTPUT_SHARED = "PRODUCER_OUTPUT_SHARED"
    """The producer's output is read by other nodes too: folding would change what they see."""
    PRODUCER_OUTPUT_IS_GRAPH_OUTPUT = "PRODUCER_OUTPUT_IS_GRAPH_OUTPUT"
    """The producer's output is itself a graph output, which must keep its value."""
    WEIGHT_NOT_CONSTANT = "WEIGHT_NOT_CONSTANT"
    """The producer's weight is a runtime input or computed at run time."""
    WEIGHT_IS_GRAPH_INPUT = "WEIGHT_IS_GRAPH_INPUT"
    """The neighbour's weight or bias is an initializer also listed as a graph input (IR >= 4): an overridable
    default, not a constant. ``freeze_initializer_inputs`` (CLI ``--freeze-initializer-inputs``) freezes it."""
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
    GEMM_INPUT_TRANSPOSED = "GEMM_INPUT_TRANSPOSED"
    """Forward fold into the following Gemm with ``transA=1``: BN's channel axis becomes the Gemm's row (batch)
    axis, which no weight of the Gemm scales."""
    FORWARD_PATH_BRANCHES = "FORWARD_PATH_BRANCHES"
    """Forward fold through pass-through nodes (Identity, Dropout, Flatten, ...): a node between the BN and the
    layer it would fold into has other readers too, which would lose the BN."""
    FORWARD_PATH_IS_GRAPH_OUTPUT = "FORWARD_PATH_IS_GRAPH_OUTPUT"
    """Forward fold through pass-through nodes: the output of a node between the BN and the layer is a graph
    output, which must keep the BN's effect."""
    DROPOUT_NOT_INFERENCE = "DROPOUT_NOT_INFERENCE"
    """Forward fold through a Dropout that is not provably the identity: ``training_mode`` true or not constant
    (opset >= 12), ``is_test`` not 1 (opset < 7), or its mask output is read."""
    FLATTEN_AXIS_NOT_CHANNEL = "FLATTEN_AXIS_NOT_CHANNEL"
    """Forward fold through a Flatten whose axis is not 1: the channels no longer own contiguous feature blocks
    of one row (axis 0 mixes in the batch, axis >= 2 moves channels into rows)."""
    RESHAPE_NOT_FLATTEN = "RESHAPE_NOT_FLATTEN"
    """Forward fold through a Reshape that is not provably the flatten ``[N, C, ...] → [N, C·…]`` (another
    target, or a target or input shape that is not known): it may mix channels."""
    REDUCE_AXES_NOT_SPATIAL = "REDUCE_AXES_NOT_SPATIAL"
    """Forward fold through a ReduceMean whose axes are not constant or include the batch or channel axis (or
    reduce every axis): only averaging over spatial axes commutes with a per-channel affine."""
    ATTRIBUTE_IS_REFERENCE = "ATTRIBUTE_IS_REFERENCE"
    """Inside a function body an attribute of the BN or its neighbour refers to a function attribute, whose value
    is only known per call site."""
    NEIGHBOUR_IN_OTHER_GRAPH = "NEIGHBOUR_IN_OTHER_GRAPH"
    """The producer (or forward consumer) lives in another graph than the BN (an outer scope or a subgraph)."""
    RESHAPE_MIXES_CHANNEL = "RESHAPE_MIXES_CHANNEL"
    """A ``Reshape``/``Flatten`` between the layer and the BN does not provably keep the layer's channel axis as
    BN's axis 1 (it moves or mixes channels, or the shapes that would prove otherwise are unknown)."""
    CONCAT_AXIS_NOT_CHANNEL = "CONCAT_AXIS_NOT_CHANNEL"
    """``Concat → BN``: the Concat joins along an axis other than the channel axis 1 (a negative axis counts from
    the rank), so BN's channels do not split into ranges of its inputs."""
    CONCAT_INPUT_REPEATED = "CONCAT_INPUT_REPEATED"
    """``Concat → BN``: one value feeds the Concat more than once; its layer would need two different folds."""

    FUNCTION_OPSET_DIFFERS = "FUNCTION_OPSET_DIFFERS"
    """A function body imports another default opset than the model, one where ``Constant`` has a different
    schema: the folded tensors (Constant nodes in a function) would make the model invalid."""
    FOLD_LOSES_PRECISION = "FOLD_LOSES_PRECISION"
    """Stored in the weights' dtype (fp16, bf16), the folded tensors would make the BN's rounding error many
    times larger than the original's (a running variance near zero, or a layer whose sum cancels): the
    estimate of :mod:`~bnfold.passes.precision` exceeds its bound. ``precision_guard=False`` (CLI
    ``--allow-precision-loss``) folds anyway."""

    def __str__(self) -> str:
        return self.value


class Skip(Exception):
    """Raised by a rule or a precondition check: leave this BN untouched for ``reason``."""

    def __init__(self, reason: SkipReason, detail: str) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail
