"""What the serving benchmark measures beside the clients' latencies, over each window: the CPU time of the
client, the service and Triton (Linux /proc), and the servers' own metrics (their Prometheus text)."""

from __future__ import annotations

import contextlib
import os
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from bench.serve_model import MODEL_ID

# -- CPU accounting (Linux /proc; None elsewhere) -----------------------------------------------------------------


_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _stat(pid: int | str) -> tuple[int, float] | None:
    """(parent pid, user + system CPU seconds) of a process, from /proc/PID/stat."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()  # after "pid (comm) ": state ppid ... utime(12) stime(13)
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / _TICK


def cpu_seconds(service_pid: int) -> dict[str, float] | None:
    """CPU seconds so far of this process (the client), the service process, and Triton (tritonserver and
    its Python-backend stubs: every descendant of the service)."""
    own = _stat("self")
    service = _stat(service_pid)
    if own is None or service is None:
        return None
    parents: dict[int, tuple[int, float]] = {}
    with contextlib.suppress(OSError):
        for entry in os.listdir("/proc"):
            if entry.isdigit() and (found := _stat(entry)) is not None:
                parents[int(entry)] = found
    descendants, frontier = 0.0, {service_pid}
    while frontier:
        children = {pid for pid, (ppid, _) in parents.items() if ppid in frontier}
        descendants += sum(parents[pid][1] for pid in children)
        frontier = children
    return {"client": own[1], "service": service[1], "triton": descendants}


# -- the servers' own metrics (Prometheus text) -------------------------------------------------------------------


TRITON_METRICS = (
    "nv_inference_count",
    "nv_inference_exec_count",
    "nv_inference_request_success",
    "nv_inference_request_duration_us",
    "nv_inference_queue_duration_us",
    "nv_inference_compute_infer_duration_us",
)
SERVICE_METRICS = tuple(
    f"visiontune_inference_{name}_duration_seconds_{part}"
    for name in ("request", "preprocess", "triton")
    for part in ("sum", "count")
)


def scrape(urls: Sequence[str]) -> dict[str, float] | None:
    """The samples of TRITON_METRICS and SERVICE_METRICS for our model, summed over label sets; None if a
    metrics endpoint does not answer."""
    totals = dict.fromkeys((*TRITON_METRICS, *SERVICE_METRICS), 0.0)
    for url in urls:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                text = response.read().decode()
        except OSError:
            return None
        for line in text.splitlines():
            name, _, rest = line.partition("{")
            if name in totals and MODEL_ID in rest.partition("}")[0]:
                totals[name] += float(rest.rpartition("}")[2].split()[0])
    return totals


def inside(before: dict[str, float] | None, after: dict[str, float] | None) -> dict[str, float] | None:
    """Means over the window from two scrapes: Triton's batch size, queue, execution and request time per
    request; the service's whole Classify, preprocessing and Triton-call time per request."""
    if before is None or after is None:
        return None
    d = {k: after[k] - before[k] for k in before}
    if not d["nv_inference_exec_count"] or not d["nv_inference_request_success"]:
        return None
    per_request = d["nv_inference_request_success"] * 1e3  # us -> ms per request
    out = {
        "triton_batch": d["nv_inference_count"] / d["nv_inference_exec_count"],
        "triton_queue_ms": d["nv_inference_queue_duration_us"] / per_request,
        # Each request of a batch is charged the whole batch's execution: this is the mean batch time.
        "triton_compute_ms": d["nv_inference_compute_infer_duration_us"] / per_request,
        "triton_request_ms": d["nv_inference_request_duration_us"] / per_request,
    }
    calls = d["visiontune_inference_request_duration_seconds_count"]
    if calls:
        for name in ("request", "preprocess", "triton"):
            out[f"service_{name}_ms"] = d[f"visiontune_inference_{name}_duration_seconds_sum"] * 1e3 / calls
    return out
