#!/usr/bin/env python3
"""Generate the Python stubs of protos/ into visiontune/v1 (run as `make protos`).

Writes `*_pb2.py` + `*_pb2_grpc.py` (grpcio-tools) and `*_pb2.pyi` + `*_pb2_grpc.pyi` (mypy-protobuf).
`--check` generates into a temporary directory and fails, listing the differences, when the committed
stubs are stale against the .proto files; the test suite runs it.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
PACKAGE_DIR = Path("visiontune") / "v1"
OUT_ROOT = ROOT
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")


def _plugin(name: str) -> str:
    # The plugins are console scripts installed beside this interpreter (mypy-protobuf).
    candidate = Path(sys.executable).parent / name
    found = str(candidate) if candidate.exists() else shutil.which(name)
    if not found:
        raise SystemExit(f"error: {name} not found; install the dev extra: pip install -e '.[dev]'")
    return found


def _googleapis_include() -> str:
    # googleapis-common-protos ships google/rpc/*.proto beside its modules.
    import google.rpc.status_pb2 as status_pb2

    return str(Path(status_pb2.__file__).resolve().parent.parent.parent)


def generate(out_root: Path, proto_root: Path = PROTO_ROOT) -> list[Path]:
    """Run protoc over every .proto under {proto_root}/visiontune/v1; return the generated files."""
    from grpc_tools import protoc

    protos = sorted(str(p.relative_to(proto_root)) for p in (proto_root / PACKAGE_DIR).glob("*.proto"))
    grpc_include = str(Path(protoc.__file__).resolve().parent / "_proto")
    (out_root / PACKAGE_DIR).mkdir(parents=True, exist_ok=True)
    args = [
        "protoc",
        f"-I{proto_root}",
        f"-I{_googleapis_include()}",
        f"-I{grpc_include}",
        f"--plugin=protoc-gen-mypy={_plugin('protoc-gen-mypy')}",
        f"--plugin=protoc-gen-mypy_grpc={_plugin('protoc-gen-mypy_grpc')}",
        f"--python_out={out_root}",
        f"--grpc_python_out={out_root}",
        f"--mypy_out={out_root}",
        f"--mypy_grpc_out={out_root}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("error: protoc failed (see above)")
    return sorted(p for p in (out_root / PACKAGE_DIR).iterdir() if p.name.endswith(GENERATED_SUFFIXES))


def stale_files(committed_root: Path, proto_root: Path = PROTO_ROOT) -> list[str]:
    """Names of generated files that differ from, are missing in, or are extra in committed_root."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = {p.name: p for p in generate(Path(tmp), proto_root)}
        committed = {
            p.name: p
            for p in (committed_root / PACKAGE_DIR).iterdir()
            if p.name.endswith(GENERATED_SUFFIXES)
        }
        problems = [f"missing: {n}" for n in sorted(fresh.keys() - committed.keys())]
        problems += [f"extra: {n}" for n in sorted(committed.keys() - fresh.keys())]
        problems += [
            f"stale: {n}"
            for n in sorted(fresh.keys() & committed.keys())
            if not filecmp.cmp(fresh[n], committed[n], shallow=False)
        ]
        return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the committed stubs are stale")
    parser.add_argument("--proto-root", type=Path, default=PROTO_ROOT, help="where the .proto files are")
    parser.add_argument("--out-root", type=Path, default=OUT_ROOT, help="where the stubs are (under visiontune/v1)")
    args = parser.parse_args()
    if args.check:
        problems = stale_files(args.out_root, args.proto_root)
        if problems:
            print("generated stubs are stale; run `make protos`:\n  " + "\n  ".join(problems))
            return 1
        print("generated stubs are up to date")
        return 0
    for old in (args.out_root / PACKAGE_DIR).glob("*_pb2*"):
        old.unlink()
    for path in generate(args.out_root, args.proto_root):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
