"""The rule registry: every fold rule bnfold knows, in the order they are listed and tried.

Adding a producer (or forward) rule means one line here: import its class and add an instance to
:data:`DEFAULT_RULES`. The driver (:mod:`~bnfold.passes.fold_batch_norm`) dispatches on ``rule.op_type``, so
the order matters only for listings (``bnfold --list-rules``) and for two rules claiming the same op type
(the later one wins). Rule names are what ``--only``/``--skip`` take.

This module imports the rule modules and nothing of the driver, so the driver can import it without a cycle.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from bnfold.passes.concat_split import ConcatSplitRule
from bnfold.passes.conv import ConvRule
from bnfold.passes.conv_transpose import ConvTransposeRule
from bnfold.passes.forward_conv import ForwardConvRule
from bnfold.passes.forward_gemm import ForwardGemmRule
from bnfold.passes.forward_matmul import ForwardMatMulRule
from bnfold.passes.gemm import GemmRule
from bnfold.passes.matmul import MatMulRule
from bnfold.passes.rule import FoldRule, ForwardFoldRule

__all__ = ["DEFAULT_RULES", "AnyRule", "rule_names", "select_rules"]

AnyRule = FoldRule | ForwardFoldRule

DEFAULT_RULES: tuple[AnyRule, ...] = (
    ConvRule(),
    ConvTransposeRule(),
    GemmRule(),
    MatMulRule(),
    ConcatSplitRule(),
    ForwardConvRule(),
    ForwardGemmRule(),
    ForwardMatMulRule(),
)


def rule_names(rules: Sequence[AnyRule] = DEFAULT_RULES) -> tuple[str, ...]:
    return tuple(rule.name for rule in rules)


def select_rules(
    rules: Sequence[AnyRule], only: Iterable[str] | None = None, skip: Iterable[str] | None = None
) -> tuple[AnyRule, ...]:
    """The rules enabled by ``only``/``skip``; unknown names raise ``ValueError`` naming the known ones."""
    only = None if only is None else list(only)
    skip = list(skip or ())
    known = rule_names(rules)
    unknown = sorted((set(only or ()) | set(skip)) - set(known))
    if unknown:
        raise ValueError(f"unknown rule(s) {', '.join(unknown)}; known rules: {', '.join(known)}")
    enabled = set(only) if only is not None else set(known)
    enabled -= set(skip)
    return tuple(rule for rule in rules if rule.name in enabled)
