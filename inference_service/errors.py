"""The one error of the inference service's own: INVALID_ARGUMENT in the words its clients have always read.

Everything else the engine and the servicer raise is a shared `visiontune.errors` class.
"""

from __future__ import annotations

from visiontune.errors import FieldViolation, InvalidArgument


class InvalidRequest(InvalidArgument):
    """InvalidArgument summarised as `2 invalid field(s): a: why; b: why` (the trainer writes `a (why)`)."""

    @staticmethod
    def counted(n: int) -> str:
        return f"{n} invalid field(s)"

    @staticmethod
    def item(violation: FieldViolation) -> str:
        return f"{violation.field}: {violation.description}"
