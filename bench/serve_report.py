"""The serving benchmark's report: why a run failed (`problems`), the paths' ratios, and the Markdown page."""

from __future__ import annotations

import datetime as dt
from typing import Any

from bench.machine import format_load
from bench.serve_load import CLASSIFY, TRITON
from bench.serve_model import PHOTO_SIDE

AGREEMENT_TOLERANCE = 1e-3  # Triton's logits and Classify's top-1 probability against the in-process model's


def problems(result: dict[str, Any]) -> list[str]:
    """Why the run counts as failed: failed requests, answers that disagree with the in-process model."""
    out = []
    for p in result["points"]:
        if p["failed"]:
            out.append(
                f"{p['path']} at concurrency {p['concurrency']}: {p['failed']} failed request(s): "
                + "; ".join(p["errors"])
            )
        if not p["completed"]:
            out.append(f"{p['path']} at concurrency {p['concurrency']}: no request completed in the window")
    for version, a in (("uint8", result["agreement"]), ("float32", result["agreement_float"])):
        if a["triton_max_logit_diff"] > AGREEMENT_TOLERANCE:
            out.append(
                f"Triton's logits ({version} version) differ from the in-process model's by "
                f"{a['triton_max_logit_diff']:.3g}"
            )
        if a["classify_max_top1_prob_diff"] > AGREEMENT_TOLERANCE:
            out.append(
                f"Classify's top-1 probabilities ({version} version) differ from the in-process model's by "
                f"{a['classify_max_top1_prob_diff']:.3g}"
            )
    if result["uint8_graph_max_logit_diff"] > AGREEMENT_TOLERANCE:
        out.append(
            f"the uint8 graph's logits differ from the float32 graph's by {result['uint8_graph_max_logit_diff']:.3g}"
        )
    return out


def payload_rows(result: dict[str, Any]) -> list[str]:
    """The payload table's rows: input bytes per image to Triton, float32 (versions before) vs uint8."""
    payload = result["payload_bytes_per_image"]
    ratio = payload["float32"] / payload["uint8"]
    return [
        f"| float32, normalised by the service (versions exported before; input_format unset) "
        f"| {payload['float32']} | {ratio:.2f} |",
        f"| uint8 pixels, normalised in the graph (the trainer's export now) | {payload['uint8']} | 1.00 |",
    ]


def ratios(result: dict[str, Any]) -> list[dict[str, Any]]:
    best = max(result["ceiling"], key=lambda c: c["images_per_second"])["images_per_second"]
    by = {(p["path"], p["concurrency"]): p for p in result["points"]}
    rows = []
    for c in result["settings"]["concurrency"]:
        ours, triton = by[(CLASSIFY, c)], by[(TRITON, c)]

        def ratio(a: float, b: float) -> float:
            return a / b if b else float("nan")

        rows.append(
            {
                "concurrency": c,
                "classify_over_triton": ratio(ours["images_per_second"], triton["images_per_second"]),
                "triton_over_ceiling": ratio(triton["images_per_second"], best),
                "classify_over_ceiling": ratio(ours["images_per_second"], best),
                "p50_classify_over_triton": ratio(ours["p50_ms"], triton["p50_ms"]),
                "p99_classify_over_triton": ratio(ours["p99_ms"], triton["p99_ms"]),
            }
        )
    return rows


def _cpu(cpu: dict[str, float] | None) -> str:
    return "n/a" if cpu is None else f"{cpu['client']:.2f} / {cpu['service']:.2f} / {cpu['triton']:.2f}"


def _inside_row(p: dict[str, Any]) -> str:
    i = p["servers"]
    if i is None:
        return f"| {p['path']} | {p['concurrency']} | n/a | n/a | n/a | n/a | n/a | {p['mean_ms']:.2f} |"
    service = (
        f"{i['service_preprocess_ms']:.2f} / {i['service_triton_ms']:.2f} / {i['service_request_ms']:.2f}"
        if "service_request_ms" in i
        else "-"
    )
    return (
        f"| {p['path']} | {p['concurrency']} | {i['triton_batch']:.2f} | {i['triton_queue_ms']:.2f} "
        f"| {i['triton_compute_ms']:.2f} | {i['triton_request_ms']:.2f} | {service} | {p['mean_ms']:.2f} |"
    )


def render_markdown(result: dict[str, Any], command: str, when: dt.datetime) -> str:
    s, m, a, af = result["settings"], result["machine"], result["agreement"], result["agreement_float"]
    fc = result["float_ceiling"]
    load_start, load_end = m["load_average"]
    best = max(result["ceiling"], key=lambda c: c["images_per_second"])
    failed = sum(p["failed"] for p in result["points"])
    lines = [
        "# Serving throughput and latency (`bench/serve`)",
        "",
        f"Run {when.strftime('%Y-%m-%d %H:%M UTC')} with `{command}`; wall time {result['wall_seconds']:.0f} s.",
        "",
        "| machine | |",
        "|---|---|",
        f"| CPU | {m['cpu']} ({m['logical_cpus']} logical CPUs) |",
        f"| device | {m['device']} |",
        f"| torch threads (in-process; the Triton model instance gets the same) | {m['torch_threads']} |",
        f"| torch / torchvision | {m['torch']} / {m['torchvision']} |",
        f"| Triton (nvidia-pytriton) / tritonclient / grpcio | {m['triton']} / {m['tritonclient']} / {m['grpcio']} |",
        f"| Python | {m['python']} |",
        f"| 1-min load average, start / end | {format_load(load_start)} / {format_load(load_end)} |",
        "",
        f"Model: MobileNetV2 ({result['weights']}), {s['classes']} labels, {s['size']}x{s['size']} input, "
        f"exported with `export_torchscript` (uint8 input, normalisation in the graph), deployed with max_batch_size "
        f"{s['max_batch_size']}, queue delay "
        f"{s['queue_delay_ms']:g} ms, 1 instance (DeployModel took {result['deploy_seconds']:.1f} s). Inputs: "
        f"{s['images']} synthetic photo-like JPEGs {PHOTO_SIDE}x{PHOTO_SIDE} (quality 90), one per request; "
        f"Triton direct gets them decoded and resized, as uint8. Each point: {s['warmup']:g} s warm-up, then "
        f"{s['seconds']:g} s measured.",
        "",
        "## Results",
        "",
        "| path | concurrency | images/s | p50 ms | p99 ms | mean ms | requests | failed "
        "| CPU ms/image: client / service / Triton |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for p in result["points"]:
        lines.append(
            f"| {p['path']} | {p['concurrency']} | {p['images_per_second']:.1f} | {p['p50_ms']:.2f} "
            f"| {p['p99_ms']:.2f} | {p['mean_ms']:.2f} | {p['completed']} | {p['failed']} "
            f"| {_cpu(p['cpu_ms_per_image'])} |"
        )
    lines += [
        "",
        "In-process ceiling (`torch.jit.load` of the same file, preprocessed uint8 pixels, `torch.inference_mode`):",
        "",
        "| batch size | images/s (median batch) | images/s (all batches) | ms per batch (p50) | batches "
        "| CPU ms/image |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for c in result["ceiling"]:
        mark = " (**ceiling**)" if c is best else ""
        lines.append(
            f"| {c['batch_size']}{mark} | {c['images_per_second']:.1f} | {c['images_per_second_overall']:.1f} "
            f"| {c['batch_p50_ms']:.2f} | {c['batches']} | {c['cpu_ms_per_image']:.2f} |"
        )
    lines += [
        "",
        f"The float32 graph (versions exported before) in-process at batch size {fc['batch_size']}: "
        f"{fc['images_per_second']:.1f} images/s at the median batch ({fc['images_per_second_overall']:.1f} overall).",
        "",
        f"Decode + resize of one {PHOTO_SIDE}x{PHOTO_SIDE} JPEG to {s['size']} px in this process "
        f"(what Classify adds before Triton): {result['preprocess_ms_per_image']:.2f} ms; the float32 path's "
        f"normalisation adds {result['normalise_ms_per_image']:.3f} ms.",
        "",
        "## Payload to Triton",
        "",
        "Input bytes one image puts in a KServe request to Triton (the tensor's raw bytes, as tritonclient "
        "serialises them; what the service sends per image of a Classify request):",
        "",
        "| version's input | bytes per image | x uint8 |",
        "|---|---:|---:|",
        *payload_rows(result),
        "",
        f"The same network as both graphs, on the same images: in-process logits max |diff| "
        f"{result['uint8_graph_max_logit_diff']:.2e}; through Triton, the float32 version's logits max |diff| "
        f"{af['triton_max_logit_diff']:.2e} and Classify's top-1 probability {af['classify_max_top1_prob_diff']:.2e} "
        f"from the in-process float32 graph (top-1 label equal on {af['classify_top1_agree']}/{af['images']}).",
        "",
        "Inside the servers, from their own metrics over each window (means per request; Triton charges each "
        'request its whole batch\'s execution, so "execution" is the mean batch time):',
        "",
        "| path | concurrency | Triton batch size | Triton queue ms | Triton execution ms | Triton request ms "
        "| service: preprocess / Triton call / whole Classify ms | client latency ms |",
        "|---|---:|---:|---:|---:|---:|---|---:|",
        *[_inside_row(p) for p in result["points"]],
        "",
        "## Ratios",
        "",
        "| concurrency | Classify / Triton direct (images/s) | Triton direct / ceiling | Classify / ceiling "
        "| p50 Classify / Triton | p99 Classify / Triton |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in ratios(result):
        lines.append(
            f"| {r['concurrency']} | {r['classify_over_triton']:.3f} | {r['triton_over_ceiling']:.3f} "
            f"| {r['classify_over_ceiling']:.3f} | {r['p50_classify_over_triton']:.2f} "
            f"| {r['p99_classify_over_triton']:.2f} |"
        )
    lines += [
        "",
        f"Ceiling: {best['images_per_second']:.1f} images/s in-process at batch size {best['batch_size']}.",
        "",
        f"Failed requests: {failed}. Agreement of the uint8 version with the in-process float32 graph over "
        f"{a['images']} images: Triton logits max |diff| {a['triton_max_logit_diff']:.2e}; Classify top-1 "
        f"probability max |diff| {a['classify_max_top1_prob_diff']:.2e}, top-1 label equal on "
        f"{a['classify_top1_agree']}/{a['images']}.",
        "",
        f"The first requests after DeployModel, one at a time (ms): Triton direct "
        f"{', '.join(f'{x:.0f}' for x in a['first_triton_ms'])}; then Classify "
        f"{', '.join(f'{x:.0f}' for x in a['first_classify_ms'])}.",
        "",
    ]
    issues = problems(result)
    if issues:
        lines += ["**Errors:**", "", *[f"- {issue}" for issue in issues], ""]
    lines += [
        "## What is measured",
        "",
        "- Throughput: requests (= images) completed inside the measured window / its length. Latency: client "
        "side, from just before the call to its return, for those requests.",
        "- Each client thread has its own gRPC connection (Classify: a channel with a local subchannel pool; "
        "Triton direct: its own `InferenceServerClient`), so concurrency C is C independent clients.",
        "- Triton's figures come from its metrics endpoint (`nv_inference_*`), the service's from its own "
        "histograms (`visiontune_inference_*_duration_seconds`), both scraped at the start and end of each "
        "window. Client latency minus the service's whole Classify time is gRPC and the Python servicer.",
        "- The clients run in the benchmark's process on the same machine: on a small CPU they compete with the "
        "service and Triton for cores. The CPU column splits the CPU time used during the window per image: "
        "this process (the clients), the inference service process, and Triton (tritonserver plus its "
        "Python-backend stub, which runs the model).",
        "- The service handles up to `--rpc-threads` (default 64) calls at once; at concurrency 32 every "
        "request is in the service, so Triton's dynamic batcher sees them all.",
        "- The ceiling has no server, no copies and no batching delay: the model alone at its best batch size, "
        "with the torch threads a Triton instance gets, taken at the median batch time (bursts of other "
        "processes on a shared machine stay out of it; the all-batches column keeps them). On a CPU the "
        "Triton path also shares the cores with the clients and (for Classify) with decoding.",
        "",
    ]
    return "\n".join(lines)
