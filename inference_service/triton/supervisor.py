"""Keeps Triton alive: if the server dies (a crash, an OOM kill), start it again and reload the deployments.

While Triton is down the deployments show LOADING and Classify answers UNAVAILABLE, the code a client
retries on; the gRPC service itself stays up, and its metrics keep being served.
"""

from __future__ import annotations

import logging
import threading

from inference_service.engine import InferenceEngine
from inference_service.triton.server import TritonError, TritonServer

log = logging.getLogger(__name__)


class TritonSupervisor:
    def __init__(
        self, server: TritonServer, engine: InferenceEngine, *, interval: float = 1.0, retry_delay: float = 5.0
    ) -> None:
        self._server = server
        self._engine = engine
        self._interval = interval
        self._retry_delay = retry_delay
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="triton-supervisor", daemon=True)
        self.restarts = 0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    def _watch(self) -> None:
        while not self._stop.wait(self._interval):
            if self._server.running:
                continue
            log.error(
                "Triton exited (code %s); restarting it. Last log lines:\n%s",
                self._server.exit_code,
                self._server.log_tail(),
            )
            self._engine.mark_all_loading("Triton restarting")
            self._server.stop()  # reaps the dead child, closes its log
            try:
                self._server.start()
            except TritonError as err:
                log.error(
                    "Triton did not come back: %s; retrying in %.0f s", str(err).splitlines()[0], self._retry_delay
                )
                self._stop.wait(self._retry_delay)
                continue
            self.restarts += 1
            self._engine.reload_all()
