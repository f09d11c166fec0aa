"""What the fold did to each BatchNormalization: immutable, JSON-serialisable records (re-exported by bnfold.report).

The library fills these; the CLI renders them (rich table, JSON). Nothing here prints.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import json
from typing import Any

from bnfold.passes.reasons import SkipReason


class FoldStatus(str, enum.Enum):
    FOLDED = "folded"  # merged into a neighbouring layer's weights: the BN is gone
    LOWERED = "lowered"  # no rule folded it; replaced by a precomputed Mul + Add (``lower_standalone``)
    SKIPPED = "skipped"  # left untouched, with a reason

    def __str__(self) -> str:
        return self.value


@dataclasses.dataclass(frozen=True)
class BatchNormRecord:
    """The outcome for one BatchNormalization node.

    Attributes:
        node: the BN node's name (or ``"<unnamed #i>"``).
        graph: where it lives: ``"main"``, a subgraph path ``"main/If_0.then_branch"``, or
            ``"function:DOMAIN:NAME"``.
        status: folded, lowered or skipped.
        reason: why it was skipped (``None`` otherwise).
        detail: one human-readable sentence about the decision.
        output: the BN's ``Y`` tensor name. After a backward fold (into the producer) or lowering, the new
            last node emits a tensor with exactly this name, so original and folded models can be compared
            at this tensor. After a forward fold (into the following Conv) the BN's ``Y`` no longer exists;
            this is then the Conv's output name, which both models share.
        producer: op type of the node feeding (or, for a forward fold, consuming) the BN, if any.
        producer_node: that node's name.
        rule: the rule that folded it (``"conv"``, ``"conv_transpose"``, ...), if any.
        scale_min, scale_max: range of the per-channel scale ``γ/√(var+ε)`` when the params are constant.
        precision_cost: for a backward fold (and a ``FOLD_LOSES_PRECISION`` skip), how many times larger the
            folded layer's rounding error in the weights' dtype is estimated to be than the original's
            (:mod:`~bnfold.passes.precision`); ``None`` where not estimated.
    """

    node: str
    graph: str
    status: FoldStatus
    reason: SkipReason | None
    detail: str
    output: str
    producer: str | None = None
    producer_node: str | None = None
    rule: str | None = None
    scale_min: float | None = None
    scale_max: float | None = None
    precision_cost: float | None = None

    @property
    def folded(self) -> bool:
        return self.status is FoldStatus.FOLDED

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["status"] = self.status.value
        data["reason"] = self.reason.value if self.reason else None
        return data


@dataclasses.dataclass(frozen=True)
class FoldReport:
    """All BatchNormalization records of one model, in graph order, plus node counts."""

    records: tuple[BatchNormRecord, ...]
    nodes_before: int
    nodes_after: int
    frozen_inputs: tuple[str, ...] = ()
    """Graph inputs whose initializers were frozen into constants first (``freeze_initializer_inputs``)."""

    @property
    def folded(self) -> tuple[BatchNormRecord, ...]:
        return tuple(record for record in self.records if record.folded)

    @property
    def lowered(self) -> tuple[BatchNormRecord, ...]:
        return tuple(record for record in self.records if record.status is FoldStatus.LOWERED)

    @property
    def skipped(self) -> tuple[BatchNormRecord, ...]:
        return tuple(record for record in self.records if record.status is FoldStatus.SKIPPED)

    def probe_tensors(self) -> dict[str, str]:
        """``{tensor name: BN node name}`` for every folded or lowered BN: tensors the original and the folded
        model both have, where a verifier can pin a mismatch on one fold."""
        return {record.output: record.node for record in self.records if record.status is not FoldStatus.SKIPPED}

    @property
    def skipped_by_reason(self) -> dict[SkipReason, int]:
        counts = collections.Counter(record.reason for record in self.skipped)
        return {reason: counts[reason] for reason in SkipReason if counts[reason]}

    def to_dict(self) -> dict[str, Any]:
        return {
            "batch_norm_total": len(self.records),
            "batch_norm_folded": len(self.folded),
            "batch_norm_lowered": len(self.lowered),
            "batch_norm_skipped": len(self.skipped),
            "skipped_by_reason": {reason.value: count for reason, count in self.skipped_by_reason.items()},
            "nodes_before": self.nodes_before,
            "nodes_after": self.nodes_after,
            "frozen_inputs": list(self.frozen_inputs),
            "records": [record.to_dict() for record in self.records],
        }

    def to_json(self, **dumps_options: Any) -> str:
        return json.dumps(self.to_dict(), **({"indent": 2} | dumps_options))
