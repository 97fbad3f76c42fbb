#!/usr/bin/env python3
"""Generate the Python stubs of protos/ into visiontune/v1, and the spec reference docs/spec.md (`make protos`).

Writes `*_pb2.py` + `*_pb2_grpc.py` (grpcio-tools), `*_pb2.pyi` + `*_pb2_grpc.pyi` (mypy-protobuf),
`visiontune/v1/proto_comments.py` (the .proto comments by full name, which the stubs do not carry) and
`docs/spec.md`: every TrainingSpec field with its type, default, range, field behaviour and comment, from the
descriptors protoc builds with source info. `--check` generates into a temporary directory and fails, listing the
differences, when the committed files are stale against the .proto files; the test suite runs it.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
PACKAGE_DIR = Path("visiontune") / "v1"
OUT_ROOT = ROOT
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")
COMMENTS = PACKAGE_DIR / "proto_comments.py"
DOCS = Path("docs") / "spec.md"
PACKAGE = "visiontune.v1"

if TYPE_CHECKING:
    from google.protobuf.descriptor import EnumDescriptor
    from google.protobuf.descriptor_pb2 import DescriptorProto, EnumDescriptorProto, FileDescriptorProto
    from visiontune.protoreflect import FieldDoc


def _plugin(name: str) -> str:
    # The plugins are console scripts installed beside this interpreter (mypy-protobuf).
    candidate = Path(sys.executable).parent / name
    found = str(candidate) if candidate.exists() else shutil.which(name)
    if not found:
        raise SystemExit(f"error: {name} not found; install the dev extra: pip install -e '.[dev]'")
    return found


def _googleapis_include() -> str:
    # googleapis-common-protos ships google/rpc/*.proto and google/api/*.proto beside its modules.
    import google.rpc.status_pb2 as status_pb2

    return str(Path(status_pb2.__file__).resolve().parent.parent.parent)


def generate(out_root: Path, proto_root: Path = PROTO_ROOT) -> list[Path]:
    """Run protoc over every .proto under {proto_root}/visiontune/v1, then write the comments module and the docs
    from the descriptor set; return the generated files."""
    from google.protobuf import descriptor_pb2
    from grpc_tools import protoc

    protos = sorted(str(p.relative_to(proto_root)) for p in (proto_root / PACKAGE_DIR).glob("*.proto"))
    grpc_include = str(Path(protoc.__file__).resolve().parent / "_proto")
    (out_root / PACKAGE_DIR).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        descriptor_set = Path(tmp) / "descriptors.pb"
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
            "--include_source_info",
            "--include_imports",
            f"--descriptor_set_out={descriptor_set}",
            *protos,
        ]
        if protoc.main(args) != 0:
            raise SystemExit("error: protoc failed (see above)")
        files = list(descriptor_pb2.FileDescriptorSet.FromString(descriptor_set.read_bytes()).file)
    comments = source_comments(f for f in files if f.package == PACKAGE)
    (out_root / COMMENTS).write_text(comments_module(comments), encoding="utf-8")
    (out_root / DOCS).parent.mkdir(parents=True, exist_ok=True)
    (out_root / DOCS).write_text(spec_markdown(files, comments), encoding="utf-8")
    stubs = sorted(p for p in (out_root / PACKAGE_DIR).iterdir() if p.name.endswith(GENERATED_SUFFIXES))
    return [*stubs, out_root / COMMENTS, out_root / DOCS]


# -- comments --------------------------------------------------------------------------------------------------

# FileDescriptorProto / DescriptorProto / EnumDescriptorProto field numbers, as SourceCodeInfo paths use them.
_FILE_MESSAGES, _FILE_ENUMS, _FILE_SYNTAX = 4, 5, 12
_MESSAGE_FIELDS, _MESSAGE_NESTED, _MESSAGE_ENUMS, _ENUM_VALUES = 2, 3, 4, 2


def source_comments(files: Iterable[FileDescriptorProto]) -> dict[str, str]:
    """The comment of every message, field, enum and enum value by full name (an enum value as
    `visiontune.v1.Architecture.ARCHITECTURE_RESNET18`), and each file's header comment by file name."""
    out: dict[str, str] = {}
    for file in files:
        located = {tuple(loc.path): loc for loc in file.source_code_info.location}

        def add(name: str, path: tuple[int, ...]) -> None:
            loc = located.get(path)  # noqa: B023 (used within this iteration only)
            text = loc.leading_comments or loc.trailing_comments if loc is not None else ""
            lines = [line.removeprefix(" ").rstrip() for line in text.strip("\n").splitlines()]
            if any(lines):
                out[name] = "\n".join(lines).strip()

        def enum(e: EnumDescriptorProto, path: tuple[int, ...], scope: str) -> None:
            name = f"{scope}.{e.name}"
            add(name, path)
            for j, value in enumerate(e.value):
                add(f"{name}.{value.name}", (*path, _ENUM_VALUES, j))

        def message(m: DescriptorProto, path: tuple[int, ...], scope: str) -> None:
            name = f"{scope}.{m.name}"
            add(name, path)
            for j, field in enumerate(m.field):
                add(f"{name}.{field.name}", (*path, _MESSAGE_FIELDS, j))
            for k, nested in enumerate(m.nested_type):
                message(nested, (*path, _MESSAGE_NESTED, k), name)
            for k, e in enumerate(m.enum_type):
                enum(e, (*path, _MESSAGE_ENUMS, k), name)

        add(file.name, (_FILE_SYNTAX,))
        for i, m in enumerate(file.message_type):
            message(m, (_FILE_MESSAGES, i), file.package)
        for i, e in enumerate(file.enum_type):
            enum(e, (_FILE_ENUMS, i), file.package)
    return dict(sorted(out.items()))


def comments_module(comments: dict[str, str]) -> str:
    entries = "".join(f"    {name!r}: {text!r},\n" for name, text in comments.items())
    return (
        '"""The comments of protos/visiontune/v1/*.proto by full name; generated by scripts/gen_protos.py '
        "(`make protos`), do not edit.\n\nThe stubs carry no comments; `visiontune.protoreflect.spec_reference` "
        'reads them from here.\n"""\n\n'
        f"COMMENTS: dict[str, str] = {{\n{entries}}}\n"
    )


# -- docs/spec.md ----------------------------------------------------------------------------------------------


def spec_markdown(files: Sequence[FileDescriptorProto], comments: dict[str, str]) -> str:
    """docs/spec.md: the TrainingSpec reference, then the enums it uses, then FindLearningRateRequest's sweep and
    StudySpec's own settings (its base_spec is a TrainingSpec, its search space is described in study.proto)."""
    from google.protobuf import descriptor_pool

    sys.path.insert(0, str(ROOT))  # this tree's visiontune, whichever one the interpreter has installed
    from visiontune import protoreflect

    pool = descriptor_pool.DescriptorPool()
    for file in files:
        pool.Add(file)
    spec = pool.FindMessageTypeByName(f"{PACKAGE}.TrainingSpec")
    request = pool.FindMessageTypeByName(f"{PACKAGE}.FindLearningRateRequest")
    study = pool.FindMessageTypeByName(f"{PACKAGE}.StudySpec")
    docs = protoreflect.spec_reference(spec, comments)
    lines = [
        "# TrainingSpec reference",
        "",
        "<!-- Generated by `make protos` (scripts/gen_protos.py) from protos/visiontune/v1/*.proto and their comments:",
        "     edit the .proto files, not this file. -->",
        "",
        comments.get("visiontune/v1/training_spec.proto", ""),
        "",
        "Every field by its path, as spec files and `--set` name it. *Default* is what an unset field takes and",
        "*Range* what the trainer accepts, both from the field's `field_rules` option (field_rules.proto);",
        "a blank default of an `optional` field depends on other fields, as its description says.",
        "",
        *_field_table(docs),
        "",
        "## Enums",
        "",
        "A spec file may write a value by its short name, in any case: `mobilenet_v2` is `ARCHITECTURE_MOBILENET_V2`.",
    ]
    for e in _enums(docs):
        lines += ["", f"### {e.name}", ""]
        if comments.get(e.full_name):
            lines += [_cell(comments[e.full_name]), ""]
        lines += ["| Value | Short name | Number | Description |", "|---|---|---|---|"]
        lines += [
            f"| `{v.name}` | `{protoreflect.short_name(e, v.number)}` | {v.number} | "
            f"{_cell(comments.get(f'{e.full_name}.{v.name}', ''))} |"
            for v in e.values
        ]
    lines += [
        "",
        "## FindLearningRateRequest",
        "",
        comments.get(request.full_name, "The LR range test: `spec` plus the sweep's settings."),
        "",
        *_field_table(
            [d for d in protoreflect.spec_reference(request, comments) if d.depth == 0 and d.field.message_type is None]
        ),
        "",
        "## StudySpec",
        "",
        comments.get(study.full_name, "A tuning study over TrainingSpec fields."),
        "The settings with a default or a range (`base_spec` is a TrainingSpec, above; `parameters`, `objective` and",
        "`sampler` are described in study.proto):",
        "",
        *_field_table(
            [
                d
                for d in protoreflect.spec_reference(study, comments)
                if d.field.message_type is None
                and not d.path.startswith("base_spec")
                and (d.rules.default is not None or d.rules.range is not None)
            ]
        ),
        "",
    ]
    return "\n".join(lines)


def _field_table(docs: Sequence[FieldDoc]) -> list[str]:
    rows = ["| Field | Type | Default | Range | Behaviour | Description |", "|---|---|---|---|---|---|"]
    for d in docs:
        interval = d.rules.range.notation() if d.rules.range is not None else ""
        rows.append(
            f"| `{d.path}` | {_type(d)} | {_default(d)} | {f'`{interval}`' if interval else ''} | "
            f"{', '.join(d.behavior)} | {_cell(d.description)} |"
        )
    return rows


def _type(d: FieldDoc) -> str:
    from visiontune import protoreflect

    name = protoreflect.type_name(d.field)
    if d.field.enum_type is not None:
        name = f"[{name}](#{name.lower()})"
    if d.field.is_repeated:
        return f"repeated {name}"
    oneof = protoreflect.real_oneof(d.field)
    if oneof is not None:
        return f"{name} (oneof `{oneof.name}`)"
    return f"optional {name}" if d.field.has_presence and d.field.message_type is None else name


def _default(d: FieldDoc) -> str:
    from visiontune import protoreflect

    value = d.default
    if value is None:
        return ""
    if d.field.enum_type is not None:
        return f"`{protoreflect.short_name(d.field.enum_type, value)}`"
    if isinstance(value, bool):
        return "`true`" if value else "`false`"
    if isinstance(value, str):
        return f"`{value!r}`" if value else '`""`'
    return f"`{protoreflect.format_number(value)}`"


def _enums(docs: Sequence[FieldDoc]) -> list[EnumDescriptor]:
    seen: dict[str, EnumDescriptor] = {}
    for d in docs:
        if d.field.enum_type is not None:
            seen.setdefault(d.field.enum_type.full_name, d.field.enum_type)
    return list(seen.values())


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


# -- check -----------------------------------------------------------------------------------------------------


def _committed(root: Path) -> dict[str, Path]:
    stubs = {p.name: p for p in (root / PACKAGE_DIR).iterdir() if p.name.endswith(GENERATED_SUFFIXES)}
    others = {str(path): root / path for path in (COMMENTS, DOCS) if (root / path).exists()}
    return {**stubs, **others}


def _name(root: Path, path: Path) -> str:
    """A stub by its file name, the comments module and the docs by their path in the tree."""
    relative = path.relative_to(root)
    return str(relative) if relative in (COMMENTS, DOCS) else path.name


def stale_files(committed_root: Path, proto_root: Path = PROTO_ROOT) -> list[str]:
    """Names of generated files that differ from, are missing in, or are extra in committed_root."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = {_name(Path(tmp), p): p for p in generate(Path(tmp), proto_root)}
        committed = _committed(committed_root)
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
    parser.add_argument("--check", action="store_true", help="fail if the committed stubs or docs are stale")
    parser.add_argument("--proto-root", type=Path, default=PROTO_ROOT, help="where the .proto files are")
    parser.add_argument(
        "--out-root", type=Path, default=OUT_ROOT, help="where the stubs (under visiontune/v1) and docs/spec.md are"
    )
    args = parser.parse_args()
    if args.check:
        problems = stale_files(args.out_root, args.proto_root)
        if problems:
            print("generated files are stale; run `make protos`:\n  " + "\n  ".join(problems))
            return 1
        print("generated stubs and docs are up to date")
        return 0
    for old in (args.out_root / PACKAGE_DIR).glob("*_pb2*"):
        old.unlink()
    for path in generate(args.out_root, args.proto_root):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
