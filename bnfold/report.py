"""Fold reports: the per-BatchNormalization records produced by :mod:`bnfold.passes` (re-exported here)."""

from bnfold.passes.reasons import SkipReason
from bnfold.passes.records import BatchNormRecord, FoldReport, FoldStatus

__all__ = ["BatchNormRecord", "FoldReport", "FoldStatus", "SkipReason"]
