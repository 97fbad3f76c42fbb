"""The one error of the inference service's own: INVALID_ARGUMENT in the words its clients have always read.

Everything else the engine and the servicer raise is a shared `visiontune.errors` class.
"""

from __future__ import annotations

from collections.abc import Sequence

from visiontune.errors import FieldViolation, InvalidArgument

_SUMMARY_MAX_FIELDS = 10


class InvalidRequest(InvalidArgument):
    """InvalidArgument summarised as `2 invalid field(s): a: why; b: why` (the trainer writes `a (why)`)."""

    @staticmethod
    def summary(violations: Sequence[FieldViolation]) -> str:
        n = len(violations)
        shown = "; ".join(f"{v.field}: {v.description}" for v in violations[:_SUMMARY_MAX_FIELDS])
        more = f"; and {n - _SUMMARY_MAX_FIELDS} more" if n > _SUMMARY_MAX_FIELDS else ""
        return f"{n} invalid field(s): {shown}{more}"
