"""Training specs as files: a `TrainingSpec` in YAML or JSON, `--set path=value` overrides, and the way back.

A spec file holds the proto's fields by their snake_case names (camelCase JSON names are accepted too), nested as
in training_spec.proto. Enum values are written by name with or without the enum's prefix, in any case:
`architecture: mobilenet_v2` is `ARCHITECTURE_MOBILENET_V2`. Every value is checked against its field's type here,
so a mistake is one line naming the key; the trainer then checks ranges and cross-field rules.

A study file is a `StudySpec` (study.proto) written the same way, with three conveniences: `base_spec` may be the
path of a TrainingSpec file (relative to the study file) instead of the spec itself; categorical values may be
written as YAML numbers and bools (`values: [16, 32]`, `[true, false]`) and enum values by short name
(`[MOBILENET_V2, RESNET18]`); and a duration such as `budget.max_duration` is `600s`, `10m`, `1h30m` or a number
of seconds.
"""

from __future__ import annotations

import difflib
import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import yaml
from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor
from google.protobuf.message import Message

from visiontune import float32, protoreflect
from visiontune.protoreflect import short_name as enum_short_name
from visiontune.v1 import study_pb2, training_spec_pb2

__all__ = [
    "SpecFileError",
    "apply_override",
    "dump_spec_yaml",
    "enum_short_name",
    "load_spec_file",
    "load_study_file",
    "parse_spec",
    "parse_study_spec",
    "spec_reference_yaml",
    "spec_to_dict",
]

_DURATION = "google.protobuf.Duration"
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(h|m|s)")
_LIST_FIELD = "a list field cannot be set with --set; write it in the file"
_TRUE = frozenset({"true", "yes", "on", "1"})
_FALSE = frozenset({"false", "no", "off", "0"})

Tree = dict[str, Any]


class SpecFileError(ValueError):
    """A spec file or override that cannot become a TrainingSpec; the message is one line naming the key."""


# -- enums -----------------------------------------------------------------------------------------------------


def _enum_value(enum: EnumDescriptor, raw: object, path: str) -> str | int:
    """`raw` as ParseDict takes it: a number as given, a name (short or full, any case) as the value's full name."""
    number = protoreflect.enum_number(enum, raw)
    if number is not None:
        return number if isinstance(raw, int) else str(enum.values_by_number[number].name)
    choices = [protoreflect.short_name(enum, v.number) for v in enum.values if v.number != 0]
    raise SpecFileError(f"{path}: unknown {enum.name} {raw!r}; expected one of {', '.join(choices)}")


def _enum_type(field: FieldDescriptor) -> EnumDescriptor:
    enum = field.enum_type
    assert enum is not None, field.full_name  # an enum field always has its enum type
    return enum


def _message_type(field: FieldDescriptor) -> Descriptor:
    message = field.message_type
    assert message is not None, field.full_name  # a message field always has its message type
    return message


# -- scalar values ---------------------------------------------------------------------------------------------


def _type_word(field: FieldDescriptor) -> str:
    if protoreflect.is_float(field):
        return "a number"
    if protoreflect.is_integer(field):
        return "an integer"
    return {FieldDescriptor.CPPTYPE_BOOL: "true or false", FieldDescriptor.CPPTYPE_STRING: "a string"}.get(
        field.cpp_type, field.full_name
    )


def _scalar(field: FieldDescriptor, raw: object, path: str) -> Any:
    """`raw` (a YAML value, or the text of a `--set`) as the value ParseDict takes for `field`."""
    cpp = field.cpp_type
    if cpp == FieldDescriptor.CPPTYPE_ENUM:
        return _enum_value(_enum_type(field), raw, path)
    if cpp == FieldDescriptor.CPPTYPE_STRING:
        if isinstance(raw, str):
            return raw
    elif cpp == FieldDescriptor.CPPTYPE_BOOL:
        if isinstance(raw, bool):
            return raw
        word = raw.strip().lower() if isinstance(raw, str) else None
        if word in _TRUE or word in _FALSE:
            return word in _TRUE
    elif protoreflect.is_integer(field):
        value: int | None = None
        if isinstance(raw, int) and not isinstance(raw, bool):
            value = raw
        elif isinstance(raw, str):
            try:
                value = int(raw.strip())
            except ValueError:
                value = None
        if value is not None:
            if not protoreflect.fits(field, value):
                raise SpecFileError(f"{path}: {value} is out of range for {protoreflect.type_name(field)}")
            return value
    elif protoreflect.is_float(field):
        number: float | None = None
        if isinstance(raw, int | float) and not isinstance(raw, bool):
            number = float(raw)
        elif isinstance(raw, str):
            # YAML 1.1 reads `1e-3` (no dot) as a string: accept numeric text for number fields.
            try:
                number = float(raw.strip())
            except ValueError:
                number = None
        if number is not None:
            if not math.isfinite(number):
                raise SpecFileError(f"{path}: expected a finite number, got {raw!r}")
            if not protoreflect.fits(field, number):
                raise SpecFileError(f"{path}: {raw!r} is too large for a 32-bit float")
            return number
    hint = " (quote it to make it text)" if cpp == FieldDescriptor.CPPTYPE_STRING else ""
    raise SpecFileError(f"{path}: expected {_type_word(field)}, got {raw!r}{hint}")


def _duration(raw: object, path: str) -> str:
    """A duration (`600s`, `10m`, `1h30m`, `90.5`: seconds) as the JSON form ParseDict takes (`600s`)."""
    seconds: float | None = None
    if isinstance(raw, int | float) and not isinstance(raw, bool):
        seconds = float(raw)
    elif isinstance(raw, str):
        text = raw.strip().lower().replace(" ", "")
        try:
            seconds = float(text)
        except ValueError:
            parts = _DURATION_PART.findall(text)
            if parts and "".join(number + unit for number, unit in parts) == text:
                seconds = sum(float(number) * {"h": 3600, "m": 60, "s": 1}[unit] for number, unit in parts)
    if seconds is None or not math.isfinite(seconds):
        raise SpecFileError(f"{path}: expected a duration such as 600s, 10m or 1h30m, got {raw!r}")
    if abs(seconds) > 315_576_000_000:  # the range of google.protobuf.Duration
        raise SpecFileError(f"{path}: {raw!r} is out of range for a duration")
    return f"{seconds:.9f}".rstrip("0").rstrip(".") + "s"


def _is_duration(field: FieldDescriptor) -> bool:
    return field.cpp_type == FieldDescriptor.CPPTYPE_MESSAGE and _message_type(field).full_name == _DURATION


# -- fields by name ------------------------------------------------------------------------------------------


def _field(descriptor: Descriptor, key: object, path: str) -> FieldDescriptor:
    """The field `key` names (snake_case or its JSON camelCase name), or one line naming the unknown key."""
    field = protoreflect.find_field(descriptor, key, json_names=True) if isinstance(key, str) else None
    if field is None:
        raise _unknown_key(descriptor, key, path)
    return field


def _unknown_key(descriptor: Descriptor, key: object, path: str) -> SpecFileError:
    where = f"{path}.{key}" if path else str(key)
    names = [f.name for f in descriptor.fields]
    close = difflib.get_close_matches(str(key), names, n=1)
    hint = f"did you mean {close[0]!r}?" if close else f"{descriptor.name} has {', '.join(names)}"
    return SpecFileError(f"unknown key {where!r} ({hint})")


def _message_tree(raw: object, descriptor: Descriptor, path: str) -> Tree:
    """A YAML mapping as a ParseDict-ready dict: keys snake_case, values typed, enums by full name."""
    if not isinstance(raw, Mapping):
        what = path or "the spec"
        raise SpecFileError(f"{what}: expected a mapping of {descriptor.name} fields, got {raw!r}")
    tree: Tree = {}
    for key, value in raw.items():
        field = _field(descriptor, key, path)
        where = f"{path}.{field.name}" if path else field.name
        if field.name in tree:
            raise SpecFileError(f"{where}: given twice (as {field.name!r} and {field.json_name!r})")
        if value is None:
            continue  # `augmentation:` with every line below commented out means "defaults"
        tree[field.name] = _field_value(field, value, where)
    oneofs: dict[str, list[str]] = {}
    for name in tree:
        oneof = protoreflect.real_oneof(descriptor.fields_by_name[name])
        if oneof is not None:
            oneofs.setdefault(oneof.name, []).append(name)
    for members in oneofs.values():
        if len(members) > 1:
            where = path or "spec"
            raise SpecFileError(f"{where}: set only one of {', '.join(members)}")
    return tree


def _field_value(field: FieldDescriptor, value: object, where: str) -> Any:
    if field.is_repeated:
        if not isinstance(value, list):
            raise SpecFileError(f"{where}: expected a list, got {value!r}")
        return [_field_value_one(field, item, f"{where}[{i}]") for i, item in enumerate(value)]
    return _field_value_one(field, value, where)


def _field_value_one(field: FieldDescriptor, value: object, where: str) -> Any:
    if _is_duration(field):
        return _duration(value, where)
    if field.cpp_type == FieldDescriptor.CPPTYPE_MESSAGE:
        return _message_tree(value, _message_type(field), where)
    return _scalar(field, value, where)


# -- overrides -----------------------------------------------------------------------------------------------


def apply_override(
    tree: Tree, assignment: str, descriptor: Descriptor = training_spec_pb2.TrainingSpec.DESCRIPTOR
) -> None:
    """Apply `path=value` (e.g. `classifier.learning_rate=0.001`) in place to a spec tree as `parse_spec` builds it.

    The value is typed by the proto field the path names. Setting a member of a oneof clears its siblings, so
    `fine_tuning.unfreeze.last_n_blocks=2` replaces a file's `unfreeze: {all: true}`.
    """
    path, sep, text = assignment.partition("=")
    path = path.strip()
    if not sep or not path:
        raise SpecFileError(f"--set expects PATH=VALUE (e.g. classifier.learning_rate=0.001), got {assignment!r}")
    try:
        fields = protoreflect.field_path(descriptor, path, json_names=True)
    except protoreflect.FieldNotFound as err:
        raise SpecFileError(f"--set {assignment}: {_unknown_key(err.message, err.name, err.parent)}") from err
    except protoreflect.NotAMessage as err:
        if err.field.is_repeated:
            raise SpecFileError(f"--set {err.where}: {_LIST_FIELD}") from err
        raise SpecFileError(f"--set {err.where}: is a value, not a group; it has no field {err.name!r}") from err
    *parents, field = fields
    node = tree
    for parent in parents:
        node = node.setdefault(parent.name, {})
    where = ".".join(f.name for f in fields)
    if field.is_repeated:
        raise SpecFileError(f"--set {where}: {_LIST_FIELD}")
    if _is_duration(field):
        node[field.name] = _duration(text, f"--set {where}")
    elif field.cpp_type == FieldDescriptor.CPPTYPE_MESSAGE:
        example = _message_type(field).fields[0].name
        raise SpecFileError(f"--set {where}: is a group of fields; set one of them, e.g. {where}.{example}=…")
    else:
        oneof = protoreflect.real_oneof(field)
        if oneof is not None:
            for sibling in oneof.fields:
                node.pop(sibling.name, None)
        node[field.name] = _scalar(field, text, f"--set {where}")


# -- loading -------------------------------------------------------------------------------------------------


def _read_tree(text: str, source: str, *, json_syntax: bool) -> object:
    if json_syntax:
        try:
            return json.loads(text)
        except json.JSONDecodeError as err:
            raise SpecFileError(f"{source}: invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}") from err
    try:
        return yaml.safe_load(text)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise SpecFileError(f"{source}: invalid YAML{at}: {err.problem or err.context}") from err
    except yaml.YAMLError as err:
        raise SpecFileError(f"{source}: invalid YAML: {err}") from err


def parse_spec(
    text: str, *, source: str = "spec", overrides: Sequence[str] = (), json_syntax: bool = False
) -> training_spec_pb2.TrainingSpec:
    """A TrainingSpec from YAML (or JSON) text, with `overrides` (`path=value`) applied in order."""
    raw = _read_tree(text, source, json_syntax=json_syntax)
    if raw is None:
        raw = {}  # an empty file: every default, which --set may fill in
    try:
        tree = _message_tree(raw, training_spec_pb2.TrainingSpec.DESCRIPTOR, "")
    except SpecFileError as err:
        raise SpecFileError(f"{source}: {err}") from err
    for assignment in overrides:
        apply_override(tree, assignment)
    spec = training_spec_pb2.TrainingSpec()
    try:
        json_format.ParseDict(tree, spec)
    except json_format.ParseError as err:  # types are checked above; this is a safety net with the same shape
        raise SpecFileError(f"{source}: {err}") from err
    return spec


def load_spec_file(path: Path, overrides: Sequence[str] = ()) -> training_spec_pb2.TrainingSpec:
    """A TrainingSpec from a .yaml/.yml/.json file (JSON by suffix; YAML otherwise)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise SpecFileError(f"{path}: cannot read: {err}") from err
    return parse_spec(text, source=str(path), overrides=overrides, json_syntax=path.suffix.lower() == ".json")


# -- study files ---------------------------------------------------------------------------------------------


def _training_field(path: str) -> FieldDescriptor | None:
    """The TrainingSpec field at dotted `path`, or None (the trainer says what is wrong with the path)."""
    try:
        return protoreflect.field_path(training_spec_pb2.TrainingSpec.DESCRIPTOR, path)[-1]
    except (protoreflect.FieldNotFound, protoreflect.NotAMessage):
        return None


def _categorical_value(field: FieldDescriptor | None, value: object) -> object:
    """A categorical value as study.proto writes it: a string (enum value by full name, "true"/"false",
    numbers as written). Anything else is left for the type check to report."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if field is not None and field.cpp_type == FieldDescriptor.CPPTYPE_ENUM and isinstance(value, str | int):
        enum = _enum_type(field)
        try:
            named = _enum_value(enum, value, "")
        except SpecFileError:
            return value if isinstance(value, str) else str(value)  # the trainer lists the allowed names
        return enum.values_by_number[named].name if isinstance(named, int) else named
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    return value


def _with_categorical_strings(raw: Mapping[Any, Any]) -> dict[Any, Any]:
    """`raw` (a study file's mapping) with each `parameters[i].categorical.values` item as a string."""
    out = dict(raw)
    parameters = out.get("parameters")
    if not isinstance(parameters, list):
        return out
    converted: list[object] = []
    for param in parameters:
        categorical = param.get("categorical") if isinstance(param, Mapping) else None
        values = categorical.get("values") if isinstance(categorical, Mapping) else None
        if isinstance(param, Mapping) and isinstance(categorical, Mapping) and isinstance(values, list):
            path = param.get("path")
            field = _training_field(path) if isinstance(path, str) else None
            param = {**param, "categorical": {**categorical, "values": [_categorical_value(field, v) for v in values]}}
        converted.append(param)
    out["parameters"] = converted
    return out


def _base_spec_key(raw: Mapping[Any, Any]) -> str | None:
    for key in ("base_spec", "baseSpec"):
        if key in raw:
            return key
    return None


def _referenced_base_spec(reference: str, source: str, base_dir: Path | None) -> Tree:
    """The TrainingSpec file a study's `base_spec: FILE` names (relative to the study file), as a spec tree."""
    path = Path(reference).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        reason = err.strerror if isinstance(err, OSError) and err.strerror else err
        raise SpecFileError(f"{source}: base_spec: cannot read {path}: {reason}") from err
    raw = _read_tree(text, str(path), json_syntax=path.suffix.lower() == ".json")
    try:
        return _message_tree({} if raw is None else raw, training_spec_pb2.TrainingSpec.DESCRIPTOR, "")
    except SpecFileError as err:
        raise SpecFileError(f"{path} (the base_spec of {source}): {err}") from err


def parse_study_spec(
    text: str,
    *,
    source: str = "study",
    overrides: Sequence[str] = (),
    json_syntax: bool = False,
    base_dir: Path | None = None,
) -> study_pb2.StudySpec:
    """A StudySpec from YAML (or JSON) text, with `overrides` (`budget.max_trials=3`,
    `base_spec.classifier.epochs=2`) applied in order. A string `base_spec` is a TrainingSpec file's path,
    relative to `base_dir` (the study file's folder)."""
    raw = _read_tree(text, source, json_syntax=json_syntax)
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise SpecFileError(f"{source}: expected a mapping of StudySpec fields, got {raw!r}")
    raw = _with_categorical_strings(raw)
    base: Tree | None = None
    key = _base_spec_key(raw)
    if key is not None and isinstance(raw[key], str):
        base = _referenced_base_spec(raw.pop(key), source, base_dir)
    try:
        tree = _message_tree(raw, study_pb2.StudySpec.DESCRIPTOR, "")
    except SpecFileError as err:
        raise SpecFileError(f"{source}: {err}") from err
    if base is not None:
        tree["base_spec"] = base
    for assignment in overrides:
        apply_override(tree, assignment, study_pb2.StudySpec.DESCRIPTOR)
    spec = study_pb2.StudySpec()
    try:
        json_format.ParseDict(tree, spec)
    except json_format.ParseError as err:
        raise SpecFileError(f"{source}: {err}") from err
    return spec


def load_study_file(path: Path, overrides: Sequence[str] = ()) -> study_pb2.StudySpec:
    """A StudySpec from a .yaml/.yml/.json file; `base_spec: FILE` is read relative to the file's folder."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise SpecFileError(f"{path}: cannot read: {err}") from err
    return parse_study_spec(
        text, source=str(path), overrides=overrides, json_syntax=path.suffix.lower() == ".json", base_dir=path.parent
    )


# -- writing -------------------------------------------------------------------------------------------------


def _plain(message: Message) -> Tree:
    """Every field of `message` as spec files write it: snake_case, enums by short name, 64-bit ints as ints."""
    out: Tree = {}
    descriptor = cast(Descriptor, message.DESCRIPTOR)  # the stubs type it as a union with upb's own class
    for field in descriptor.fields:
        if field.has_presence and not message.HasField(field.name):
            continue  # unset optional: the trainer's default applies
        value = getattr(message, field.name)
        if field.is_repeated:
            out[field.name] = [_plain_value(field, v) for v in value]
        else:
            out[field.name] = _plain_value(field, value)
    return out


def _plain_value(field: FieldDescriptor, value: Any) -> Any:
    if _is_duration(field):
        return json_format.MessageToDict(value)  # `600s`, which a study file reads back
    if field.cpp_type == FieldDescriptor.CPPTYPE_MESSAGE:
        return _plain(value)
    if field.cpp_type == FieldDescriptor.CPPTYPE_ENUM:
        return enum_short_name(_enum_type(field), value)
    if field.cpp_type == FieldDescriptor.CPPTYPE_FLOAT:
        return float32.shortest(value)
    return value


def spec_to_dict(spec: training_spec_pb2.TrainingSpec) -> Tree:
    """The spec as a plain dict that `parse_spec` reads back to an equal spec."""
    return _plain(spec)


def dump_spec_yaml(spec: training_spec_pb2.TrainingSpec, header: str = "") -> str:
    """The spec as YAML for `visiontune train`; `header` lines become `#` comments at the top."""
    body = yaml.safe_dump(spec_to_dict(spec), sort_keys=False, default_flow_style=False, allow_unicode=True)
    comments = "".join(f"# {line}\n" if line else "#\n" for line in header.splitlines())
    return comments + body


# -- the reference -------------------------------------------------------------------------------------------

_SENTENCE_END = re.compile(r"(?<!e\.g)(?<!i\.e)\.\s")


def spec_reference_yaml() -> str:
    """The TrainingSpec reference as commented YAML (for `visiontune spec defaults`): every field at its default,
    with its range and a one-line description; docs/spec.md has the full text.

    `parse_spec` reads it back to a spec that validates like an empty one once `dataset.uri` is set: a required
    field is written without a value, and a oneof's members and a field whose default depends on other fields
    (the fine-tuning LR, a schedule's peak LR) are commented out.
    """
    lines = [
        "# The TrainingSpec reference: every field at its default, with its range (docs/spec.md).",
        "# An unset field takes its default: keep only the fields you change.",
    ]
    for doc in protoreflect.spec_reference(training_spec_pb2.TrainingSpec.DESCRIPTOR):
        indent = "  " * doc.depth
        text = " ".join(doc.description.split())
        computed = doc.default is None and doc.field.message_type is None  # the whole comment says why
        summary = text if computed else _SENTENCE_END.split(text, maxsplit=1)[0]
        if summary:
            lines.append(f"{indent}# {summary.rstrip('.')}.")
        facts = ["required"] if "REQUIRED" in doc.behavior else []
        if doc.rules.range is not None:
            facts.append(f"range {doc.rules.range.notation()}")
        note = f"  # {'; '.join(facts)}" if facts else ""
        if doc.field.message_type is not None or "REQUIRED" in doc.behavior:
            lines.append(f"{indent}{doc.field.name}:{note}")
        elif doc.default is None:
            lines.append(f"{indent}# {doc.field.name}:{note}")
        else:
            lines.append(f"{indent}{doc.field.name}: {_yaml_scalar(doc.field, doc.default)}{note}")
    return "\n".join(lines) + "\n"


def _yaml_scalar(field: FieldDescriptor, value: Any) -> str:
    if field.cpp_type == FieldDescriptor.CPPTYPE_ENUM:
        return enum_short_name(_enum_type(field), value)
    return yaml.safe_dump(value).removesuffix("\n").removesuffix("\n...")
