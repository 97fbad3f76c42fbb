"""Paging of every List RPC (AIP-158): one default and one maximum page size, one page-token format.

`page_size` 0 means "unspecified" and gets `DEFAULT_PAGE_SIZE`; more than `MAX_PAGE_SIZE` is served as
`MAX_PAGE_SIZE`; a negative one is an error. A page token is opaque to clients: base64 of the position after
the last item handed out and a fingerprint of the request's filter, so a token is refused under another
filter instead of silently skipping or repeating items (docs/architecture.md §3).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Callable, Sequence
from typing import Final, TypeVar

from visiontune.errors import FieldViolation, InvalidArgument

__all__ = [
    "DEFAULT_PAGE_SIZE",
    "MAX_PAGE_SIZE",
    "InvalidPage",
    "decode_page_token",
    "encode_page_token",
    "filter_fingerprint",
    "page_of",
    "page_size",
    "page_size_violations",
]

DEFAULT_PAGE_SIZE: Final = 50
MAX_PAGE_SIZE: Final = 1000

T = TypeVar("T")
Position = tuple[int | str, ...]


class InvalidPage(InvalidArgument, ValueError):
    """A page_size or page_token this server cannot use (a ValueError too, for callers outside gRPC)."""


def page_size_violations(requested: int) -> list[FieldViolation]:
    """What is wrong with a request's `page_size`, for the edge to report with the request's other fields."""
    return [FieldViolation("page_size", "must be >= 0")] if requested < 0 else []


def page_size(requested: int) -> int:
    """The number of items to serve for a request's `page_size` (0: the default; clamped to the maximum)."""
    if violations := page_size_violations(requested):
        raise InvalidPage(violations)
    if requested == 0:
        return DEFAULT_PAGE_SIZE
    return min(requested, MAX_PAGE_SIZE)


def filter_fingerprint(parts: Sequence[object]) -> str:
    """A short hash of what a list request filters on (JSON-able parts): a token is valid only under it."""
    return hashlib.sha256(json.dumps(list(parts), sort_keys=True).encode()).hexdigest()[:16]


def encode_page_token(position: Position, fingerprint: str) -> str:
    raw = json.dumps({"p": list(position), "f": fingerprint}, separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode("ascii")


def decode_page_token(token: str, fingerprint: str, shape: tuple[type[int] | type[str], ...]) -> Position:
    """The position in `token`, whose items have the types in `shape`; InvalidPage for a token this server did
    not issue, or issued under another filter."""
    foreign = InvalidPage(
        [FieldViolation("page_token", f"invalid page_token {token!r}: not a token this server issued")]
    )
    try:
        payload = json.loads(base64.urlsafe_b64decode(token.encode("ascii")).decode("utf-8"))
        position, token_fingerprint = payload["p"], payload["f"]
    except (binascii.Error, UnicodeError, ValueError, TypeError, KeyError) as exc:
        raise foreign from exc
    # `type(...) is`: JSON's true/false are bools, which isinstance would accept as ints.
    if (
        not isinstance(position, list)
        or len(position) != len(shape)
        or any(type(value) is not kind for value, kind in zip(position, shape, strict=False))
    ):
        raise foreign
    if token_fingerprint != fingerprint:
        raise InvalidPage(
            [
                FieldViolation(
                    "page_token", "invalid page_token: it was issued for a different filter than this request's"
                )
            ]
        )
    return tuple(position)


def page_of(
    items: Sequence[T], key: Callable[[T], str], requested_size: int, token: str, filter_parts: Sequence[object]
) -> tuple[list[T], str]:
    """One page of `items` (sorted by `key`, unique) and the next page's token ("" on the last page).

    The token holds the last key handed out, so the pages stay consistent while items come and go.
    """
    size = page_size(requested_size)
    fingerprint = filter_fingerprint(filter_parts)
    after = str(decode_page_token(token, fingerprint, (str,))[0]) if token else None
    rest = [item for item in items if after is None or key(item) > after]
    page = rest[:size]
    more = len(rest) > size
    return page, encode_page_token((key(page[-1]),), fingerprint) if more else ""
