"""bench/results/gpu.md from what `scripts/gpu-check.sh` measured: the machine, the AMP job (device, precision,
images/s per epoch, accuracy), the deployment, and the training and serving benches' own reports.

`python -m bench.gpu_report RESULTS_DIR OUT.md`
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.machine import format_load, load_average


def _word(value: str | None, prefix: str) -> str:
    """An enum value as JSON has it ("PRECISION_AMP_BF16"), without its prefix."""
    return (value or "?").removeprefix(prefix).lower()


def _job_section(title: str, job: dict[str, Any]) -> list[str]:
    result = job.get("result", {})
    device = result.get("device", {})
    lines = [f"## {title}", ""]
    gpus = f" {device.get('gpu_count', 1)} x {device.get('gpu_name', '?')}" if device.get("type") == "cuda" else ""
    lines.append(
        f"`{job['name']}`: {_word(job.get('state'), 'JOB_STATE_')}; device {device.get('type', '?')}{gpus}, "
        f"precision {_word(device.get('precision'), 'PRECISION_')}, CUDA build {device.get('cuda_build') or 'none'}, "
        f"driver {device.get('driver_version') or 'none'}"
    )
    lines += ["", "| stage | epoch | images/s | train loss | val accuracy |", "|---|---|---:|---:|---:|"]
    for epoch in result.get("history", []):
        lines.append(
            f"| {_word(epoch.get('stage'), 'STAGE_')} | {epoch.get('epoch', 0)} | "
            f"{epoch.get('images_per_second', 0):,.0f} | {epoch.get('train_loss', 0):.4f} | "
            f"{epoch.get('validation_accuracy', 0):.3f} |"
        )
    accuracy = result.get("metrics", {}).get("val_accuracy", {}).get("mean")
    if accuracy is not None:
        lines += ["", f"Final validation accuracy {accuracy:.3f}."]
    return [*lines, ""]


def _included(title: str, path: Path) -> list[str]:
    if not path.exists():
        return [f"## {title}", "", f"(not run: no {path.name})", ""]
    body = path.read_text().splitlines()
    # The bench's own title becomes a sub-heading here.
    body = [("#" + line) if line.startswith("#") else line for line in body]
    return [f"## {title}", "", *body, ""]


def report(results: Path) -> str:
    machine = json.loads((results / "machine.json").read_text())
    gpus = machine.get("gpus") or []
    lines = [
        "# The GPU path, measured (`make gpu-check`)",
        "",
        f"Machine: {', '.join(gpus) if gpus else 'no GPU (a CPU smoke run of the script)'}; torch "
        f"{machine.get('torch')}, CUDA build {machine.get('cuda_build') or 'none'}, driver "
        f"{machine.get('driver_version') or 'none'} (supports CUDA {machine.get('driver_cuda_version') or '-'}), "
        f"cuDNN {machine.get('cudnn_version', 0)}; load average when the report was written "
        f"{format_load(load_average())}.",
        "",
    ]
    for job_file, title in (("gpu-amp.json", "A job with AMP (precision AUTO)"), ("gpu-ddp.json", "A multi-GPU job")):
        if (results / job_file).exists():
            lines += _job_section(title, json.loads((results / job_file).read_text()))
    if (results / "deployments.txt").exists():
        lines += ["## The deployment", "", "```", *(results / "deployments.txt").read_text().splitlines(), "```", ""]
    if (results / "classified.json").exists():
        rows = json.loads((results / "classified.json").read_text())
        unknown = sum(1 for r in rows if r.get("unknown"))
        lines += [f"Classified {len(rows)} unseen images through Triton ({unknown} called unknown).", ""]
    lines += _included("Training throughput on this device", results / "train_throughput.md")
    lines += _included("Serving on this device", results / "serve.md")
    parity = results / "jpeg_parity.txt"
    # pytest's last line: how many parity tests passed, failed or were skipped on this device.
    outcome = (parity.read_text().strip().splitlines() or ["(no output)"])[-1] if parity.exists() else "(not run)"
    lines += ["## JPEG decoding on this device (nvJPEG) against the trainer's decoder", "", outcome, ""]
    return "\n".join(lines).rstrip() + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    results, out = Path(args[0]), Path(args[1])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report(results))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
