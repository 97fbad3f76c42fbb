"""A local copy of the executor's Jobs or pods, kept current with the watch API.

List once, then watch from the list's resourceVersion; each watch call ends after `WATCH_TIMEOUT_S` (the server closes
it) and the next resumes from the last version seen. When the server no longer has that version (410 Gone: it was
compacted away, or the watch was down too long) the copy is listed again from scratch. A failing API server is
retried with a growing pause, and the copy is kept meanwhile: what it says is only a little stale.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from typing import Any, Final

from kubernetes import watch as k8s_watch
from kubernetes.client.exceptions import ApiException
from urllib3.exceptions import HTTPError

log = logging.getLogger(__name__)

Obj = dict[str, Any]
WATCH_TIMEOUT_S: Final = 60
_GONE: Final = 410
_RETRY_MAX_S: Final = 10.0


class WatchedObjects:
    """Objects of one kind in one namespace matching `selector`, by name. Thread-safe; `changed` is called (from the
    watch thread) after every change."""

    def __init__(
        self,
        list_fn: Callable[..., Any],
        namespace: str,
        selector: str,
        *,
        kind: str,
        changed: Callable[[], None] = lambda: None,
    ) -> None:
        self._list_fn = list_fn
        self._namespace = namespace
        self._selector = selector
        self.kind = kind
        self._changed = changed
        self._objects: dict[str, Obj] = {}
        self._lock = threading.Lock()
        self._version = ""
        self._listed = threading.Event()
        self._stop = threading.Event()
        self._watch: k8s_watch.Watch | None = None
        self._thread: threading.Thread | None = None
        self.relists = 0  # how often the copy was listed again after a 410 (tests and logs read it)

    # -- reading

    def get(self, name: str) -> Obj | None:
        with self._lock:
            return self._objects.get(name)

    def select(self, predicate: Callable[[Obj], bool]) -> list[Obj]:
        with self._lock:
            return [obj for obj in self._objects.values() if predicate(obj)]

    def names(self) -> list[str]:
        with self._lock:
            return list(self._objects)

    def put(self, obj: Obj) -> None:
        """An object this process just created or read: known before its watch event comes (never older than ours)."""
        name = obj["metadata"]["name"]
        with self._lock:
            known = self._objects.get(name)
            if known is None or _version_of(known) <= _version_of(obj):
                self._objects[name] = obj

    def forget(self, name: str) -> None:
        """An object the API server says is gone (a GET answered 404)."""
        with self._lock:
            self._objects.pop(name, None)

    # -- lifecycle

    def start(self, timeout_s: float = 30.0) -> None:
        """Start watching; returns once the first list is in (or after `timeout_s`, the watch carrying on)."""
        self._thread = threading.Thread(target=self._run, name=f"watch-{self.kind}", daemon=True)
        self._thread.start()
        if not self._listed.wait(timeout_s):
            log.warning("the first list of %s is late; carrying on", self.kind, extra={"namespace": self._namespace})

    def stop(self) -> None:
        self._stop.set()
        if self._watch is not None:
            self._watch.stop()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        pause = 0.5
        while not self._stop.is_set():
            try:
                if not self._version:
                    self._relist()
                self._watch_once()
                pause = 0.5
            except ApiException as err:
                if self._stop.is_set():
                    return
                if err.status == _GONE:
                    log.info("%s watch expired (410 Gone); listing again", self.kind)
                    self._version = ""
                    self.relists += 1
                    continue
                log.warning("watching %s failed: %s %s; retrying", self.kind, err.status, err.reason)
            except (HTTPError, OSError, ValueError) as err:
                if self._stop.is_set():
                    return  # stop() closed the stream under the watch
                log.warning("watching %s failed: %s; retrying", self.kind, err)
            self._stop.wait(pause)
            pause = min(pause * 2, _RETRY_MAX_S)

    def _relist(self) -> None:
        response = self._list_fn(self._namespace, label_selector=self._selector, _preload_content=False)
        listing = json.loads(response.data)
        with self._lock:
            self._objects = {item["metadata"]["name"]: item for item in listing.get("items", [])}
        self._version = listing["metadata"]["resourceVersion"]
        self._listed.set()
        self._changed()

    def _watch_once(self) -> None:
        self._watch = k8s_watch.Watch()
        stream = self._watch.stream(
            self._list_fn,
            self._namespace,
            label_selector=self._selector,
            resource_version=self._version,
            timeout_seconds=WATCH_TIMEOUT_S,
            allow_watch_bookmarks=True,
            deserialize=False,
        )
        for event in stream:
            if self._stop.is_set():
                return
            kind, obj = event["type"], event["object"]
            if kind == "ERROR":
                raise ApiException(status=obj.get("code"), reason=obj.get("reason") or obj.get("message"))
            self._version = obj["metadata"]["resourceVersion"]
            if kind == "BOOKMARK":
                continue
            name = obj["metadata"]["name"]
            with self._lock:
                if kind == "DELETED":
                    self._objects.pop(name, None)
                else:
                    self._objects[name] = obj
            self._changed()


def _version_of(obj: Obj) -> int:
    # resourceVersions are opaque strings by contract but etcd revisions in practice; compare when they are numbers.
    try:
        return int(obj["metadata"].get("resourceVersion", 0))
    except ValueError:
        return 0
