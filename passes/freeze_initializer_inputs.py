"""Freeze initializers that are also graph inputs: remove them from the main graph's inputs (opt-in).

Old exporters (PyTorch < 1.4's ``keep_initializers_as_inputs=True``, Caffe2, some converters) list every
initializer as a graph input too. Since IR 4 such an initializer is only a *default*: the caller may feed
another tensor under that name at run time, so its value is not a constant and the fold leaves BNs that read
it (``BN_PARAMS_ARE_GRAPH_INPUTS``, ``WEIGHT_IS_GRAPH_INPUT``). Removing the initializers from the graph
inputs makes them ordinary constants the fold can use.

Risk: the model's interface changes. A caller that fed those inputs (to override weights at run time) can no
longer do so; feeding them now fails with an unknown-input error. Only use it when nobody overrides them —
the usual case, since exporters listed them out of habit, not for overriding.

Scope: the main graph only (subgraphs and function bodies cannot hold overridable initializers). IR < 4
models are left as they are: there every initializer must be listed as an input and already counts as a
constant. Graph inputs without an initializer (true runtime inputs) are never touched.
"""

from __future__ import annotations

import dataclasses

import onnx_ir as ir


@dataclasses.dataclass
class FreezeResult(ir.passes.PassResult):
    """``PassResult`` plus the names of the inputs that were frozen, in input order."""

    frozen: tuple[str, ...] = ()


class FreezeInitializerInputsPass(ir.passes.InPlacePass):
    """Remove every initializer from the main graph's inputs (IR >= 4); report which inputs were frozen."""

    def call(self, model: ir.Model) -> FreezeResult:
        if (model.ir_version or 0) < 4:
            return FreezeResult(model, modified=False)
        graph = model.graph
        frozen = [value for value in graph.inputs if value.is_initializer()]
        for value in frozen:
            graph.inputs.remove(value)
        return FreezeResult(model, modified=bool(frozen), frozen=tuple(value.name for value in frozen))
