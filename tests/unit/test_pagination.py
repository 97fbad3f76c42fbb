"""The paging rules every List RPC shares (visiontune.pagination, AIP-158): sizes, tokens, in-memory pages."""

from __future__ import annotations

import base64
import json

import pytest
from visiontune import pagination
from visiontune.errors import FieldViolation
from visiontune.pagination import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE, InvalidPage


def test_page_size_default_clamp_and_refusal() -> None:
    assert pagination.page_size(0) == DEFAULT_PAGE_SIZE == 50
    assert pagination.page_size(7) == 7
    assert pagination.page_size(MAX_PAGE_SIZE + 1) == MAX_PAGE_SIZE == 1000
    assert pagination.page_size_violations(0) == []
    assert pagination.page_size_violations(-1) == [FieldViolation("page_size", "must be >= 0")]
    with pytest.raises(InvalidPage) as refused:
        pagination.page_size(-1)
    assert refused.value.violations == (FieldViolation("page_size", "must be >= 0"),)


def test_a_token_round_trips_only_under_its_filter() -> None:
    fingerprint = pagination.filter_fingerprint(["vt_jobs", ["RUNNING"]])
    token = pagination.encode_page_token((1_700_000_000_000_000, "job-1"), fingerprint)
    assert pagination.decode_page_token(token, fingerprint, (int, str)) == (1_700_000_000_000_000, "job-1")

    other = pagination.filter_fingerprint(["vt_jobs", []])
    with pytest.raises(InvalidPage, match="different filter") as refused:
        pagination.decode_page_token(token, other, (int, str))
    assert [v.field for v in refused.value.violations] == ["page_token"]


@pytest.mark.parametrize(
    "token",
    [
        "!!! not base64 !!!",
        base64.urlsafe_b64encode(b"not json").decode(),
        base64.urlsafe_b64encode(json.dumps({"p": ["x", 3], "f": "f"}).encode()).decode(),  # wrong types
        base64.urlsafe_b64encode(json.dumps({"p": [True, "a"], "f": "f"}).encode()).decode(),  # a bool is no int
        base64.urlsafe_b64encode(json.dumps({"p": [1], "f": "f"}).encode()).decode(),  # wrong length
        base64.urlsafe_b64encode(json.dumps({"t": 1, "id": "a", "f": "f"}).encode()).decode(),
    ],
)
def test_a_foreign_token_is_refused(token: str) -> None:
    with pytest.raises(InvalidPage, match="not a token this server issued"):
        pagination.decode_page_token(token, "f", (int, str))


def test_pages_of_an_in_memory_list_are_stable_while_items_come_and_go() -> None:
    names = [f"models/m/versions/v{i}" for i in range(5)]
    first, token = pagination.page_of(names, str, 2, "", ["m"])
    assert first == names[:2]
    changed = [n for n in names if n != names[0]] + ["models/m/versions/v9"]  # one removed, one added after
    second, token = pagination.page_of(changed, str, 2, token, ["m"])
    assert second == names[2:4]
    last, token = pagination.page_of(changed, str, 2, token, ["m"])
    assert (last, token) == ([names[4], "models/m/versions/v9"], "")
    assert pagination.page_of([], str, 0, "", [None]) == ([], "")
    with pytest.raises(InvalidPage, match="different filter"):
        pagination.page_of(names, str, 2, pagination.page_of(names, str, 1, "", ["m"])[1], [None])
