"""What a dead worker said last, as the one line of its job's error (the executor's `last_log_line`)."""

from __future__ import annotations

import json
from pathlib import Path

from trainer_service.jobs.local_workers import last_log_line

CAUSE = "S3 at http://h:1 unavailable: put 'b/k' failed"


def _record(msg: str, **fields: object) -> str:
    return json.dumps({"ts": "2026-01-01T12:00:00.000Z", "level": "INFO", "logger": "w", "msg": msg, **fields})


def test_an_uncaught_traceback_is_its_exception_line(tmp_path: Path) -> None:
    log = tmp_path / "worker-1.log"
    log.write_text(
        "\n".join(
            [
                _record("stage started"),
                "Traceback (most recent call last):",
                '  File "/x/worker.py", line 3, in run',
                "    self._end(state)",
                "KeyError: 'a'",
                "",
                "During handling of the above exception, another exception occurred:",
                "",
                "Traceback (most recent call last):",
                '  File "/x/worker.py", line 9, in _end',
                "    store.put_bytes(key, data)",
                "    ~~~~~~~~~~~~~~~^^^^^^^^^^^",
                f"visiontune.store_errors.StoreUnavailable: {CAUSE}",
            ]
        )
        + "\n"
    )
    assert last_log_line(log) == f"visiontune.store_errors.StoreUnavailable: {CAUSE}"


def test_a_json_record_is_its_message_and_the_exception_line_of_its_traceback(tmp_path: Path) -> None:
    log = tmp_path / "worker-1.log"
    exc = 'Traceback (most recent call last):\n  File "x", line 1, in f\nMemoryError: out of memory'
    log.write_text(_record("epoch ended") + "\n" + _record("job failed", exc=exc) + "\n\n")
    assert last_log_line(log) == "job failed: MemoryError: out of memory"
    log.write_text(_record("epoch 3 ended", job="j") + "\n")
    assert last_log_line(log) == "epoch 3 ended"


def test_plain_lines_and_missing_logs(tmp_path: Path) -> None:
    log = tmp_path / "worker-1.log"
    log.write_text("Fatal Python error: Segmentation fault\n\n  thread 1\n")
    assert last_log_line(log) == "thread 1"
    log.write_text("x" * 2000 + "\n")
    assert len(last_log_line(log)) == 500
    log.write_text("")
    assert last_log_line(log) == "(the worker log is empty)"
    assert last_log_line(tmp_path / "missing.log") == "(no worker log)"
