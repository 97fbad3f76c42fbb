"""The v1 protos read like a Google API (AIP-122, AIP-123, AIP-203; docs/architecture.md §3).

Every field says its behaviour, every resource pattern is the one `visiontune.names` parses, every reference
points to a declared resource, and server reflection hands clients the annotations with the services.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.api import field_behavior_pb2, resource_pb2
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.descriptor import Descriptor, FieldDescriptor, FileDescriptor
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from visiontune import names
from visiontune.client import make_channel
from visiontune.server import GrpcServer, ServiceBinding
from visiontune.settings import S3Settings, ServerSettings
from visiontune.v1 import (
    inference_service_pb2,
    inference_service_pb2_grpc,
    job_pb2,
    manifest_pb2,
    study_pb2,
    training_service_pb2,
    training_service_pb2_grpc,
    training_spec_pb2,
)

FB = field_behavior_pb2.FieldBehavior
REQUIRED, OPTIONAL, OUTPUT_ONLY = FB.REQUIRED, FB.OPTIONAL, FB.OUTPUT_ONLY
IMMUTABLE, IDENTIFIER = FB.IMMUTABLE, FB.IDENTIFIER

# Every file of the API: training_spec.proto's fields also carry the spec rules (field_rules.proto).
FILES: list[FileDescriptor] = [
    m.DESCRIPTOR
    for m in (job_pb2, study_pb2, training_service_pb2, inference_service_pb2, manifest_pb2, training_spec_pb2)
]
# Fields that name one of several resource types (`*`, AIP-122) and the types they accept.
MULTI_TYPE_REFERENCES = {
    "visiontune.v1.ClassifyRequest.model": {"visiontune.io/Model", "visiontune.io/ModelVersion"},
}
# How `visiontune.names` formats and parses each resource type: (format, parse back to the pattern's IDs).
NAMES: dict[str, tuple[Callable[..., str], Callable[[str], tuple[str, ...]]]] = {
    "visiontune.io/Job": (names.job_name, lambda n: (names.parse_job_name(n),)),
    "visiontune.io/Study": (names.study_name, lambda n: (names.parse_study_name(n),)),
    "visiontune.io/Model": (names.model_name, lambda n: (names.parse_model_name(n),)),
    "visiontune.io/ModelVersion": (
        lambda model, version: str(names.ModelVersionName(model, version)),
        lambda n: (names.parse_model_version_name(n).model, names.parse_model_version_name(n).version),
    ),
}
# Strings that name a resource by their field name; each must carry a reference (or be the resource's own name).
RESOURCE_FIELD_NAMES = {"name", "job", "jobs", "study", "model", "model_version"}


def _messages(fd: FileDescriptor) -> Iterator[Descriptor]:
    def walk(msg: Descriptor) -> Iterator[Descriptor]:
        if msg.GetOptions().map_entry:
            return  # the key/value of a map field; the map field itself is annotated
        yield msg
        for nested in msg.nested_types:
            yield from walk(nested)

    for msg in fd.message_types_by_name.values():
        yield from walk(msg)


def _fields() -> list[FieldDescriptor]:
    return [f for fd in FILES for msg in _messages(fd) for f in msg.fields]


def _behaviors(field: FieldDescriptor) -> list[int]:
    return list(field.GetOptions().Extensions[field_behavior_pb2.field_behavior])


def _reference(field: FieldDescriptor) -> resource_pb2.ResourceReference | None:
    options = field.GetOptions()
    return (
        options.Extensions[resource_pb2.resource_reference]
        if options.HasExtension(resource_pb2.resource_reference)
        else None
    )


def _resources() -> dict[str, tuple[resource_pb2.ResourceDescriptor, Descriptor | None]]:
    """Every declared resource type: its descriptor and its message (None for a file-level definition)."""
    found: dict[str, tuple[resource_pb2.ResourceDescriptor, Descriptor | None]] = {}
    for fd in FILES:
        for definition in fd.GetOptions().Extensions[resource_pb2.resource_definition]:
            assert definition.type not in found, f"{definition.type} declared twice"
            found[definition.type] = (definition, None)
        for msg in _messages(fd):
            if msg.GetOptions().HasExtension(resource_pb2.resource):
                resource = msg.GetOptions().Extensions[resource_pb2.resource]
                assert resource.type not in found, f"{resource.type} declared twice"
                found[resource.type] = (resource, msg)
    return found


# ------------------------------------------------------------------------------------------------- field behavior


def test_every_field_says_its_behavior() -> None:
    fields = {f.full_name: f for f in _fields()}
    missing = sorted(name for name, f in fields.items() if not _behaviors(f))
    assert not missing, f"fields without google.api.field_behavior: {missing}"


def _contradiction(behaviors: set[int]) -> str | None:
    if {REQUIRED, OPTIONAL} <= behaviors:
        return "both required and optional"
    if OUTPUT_ONLY in behaviors and behaviors != {OUTPUT_ONLY}:
        return "output only, so nothing else"
    if IDENTIFIER in behaviors and behaviors != {IDENTIFIER}:
        return "the identifier takes no other behavior (AIP-203)"
    if IMMUTABLE in behaviors and not behaviors & {REQUIRED, OPTIONAL}:
        return "immutable, yet not said to be an input"
    return None


def test_no_field_has_contradicting_behaviors() -> None:
    problems = {f.full_name: _contradiction(set(_behaviors(f))) for f in _fields()}
    assert not {name: why for name, why in problems.items() if why}


def test_response_messages_are_output_only_and_request_messages_are_input() -> None:
    for fd in (training_service_pb2.DESCRIPTOR, inference_service_pb2.DESCRIPTOR):
        for service in fd.services_by_name.values():
            for method in service.methods:
                if method.output_type.file is fd:  # Job and Study live in their own files: checked below
                    for f in method.output_type.fields:
                        assert _behaviors(f) == [OUTPUT_ONLY], f.full_name
                for f in method.input_type.fields:
                    assert OUTPUT_ONLY not in _behaviors(f), f.full_name


def test_the_servers_set_the_resource_fields_clients_do_not() -> None:
    inputs = {
        job_pb2.Job.DESCRIPTOR: {"display_name", "spec", "labels"},  # what CreateJob reads
        study_pb2.Study.DESCRIPTOR: {"display_name", "spec"},  # what CreateStudy reads
    }
    for msg, read in inputs.items():
        for f in msg.fields:
            behaviors = set(_behaviors(f))
            if f.name == "name":
                assert behaviors == {IDENTIFIER}
            elif f.name in read:
                assert behaviors & {REQUIRED, OPTIONAL}, f.full_name
            else:
                assert behaviors == {OUTPUT_ONLY}, f.full_name
    for msg in (job_pb2.Job.DESCRIPTOR, study_pb2.Study.DESCRIPTOR):
        assert set(_behaviors(msg.fields_by_name["spec"])) == {REQUIRED, IMMUTABLE}


def test_what_the_trainer_always_writes_into_a_manifest_is_required() -> None:
    for msg in (
        manifest_pb2.ModelManifest.DESCRIPTOR,
        manifest_pb2.Preprocessing.DESCRIPTOR,
        manifest_pb2.Weights.DESCRIPTOR,
    ):
        for f in msg.fields:
            assert _behaviors(f) == ([IDENTIFIER] if f.name == "name" else [REQUIRED]), f.full_name


# ------------------------------------------------------------------------------------------------------ resources


def test_resources_are_the_ones_names_py_parses() -> None:
    assert set(_resources()) == set(NAMES)


@pytest.mark.parametrize("resource_type", sorted(NAMES))
def test_each_resource_pattern_is_the_one_names_py_formats_and_parses(resource_type: str) -> None:
    resource, _ = _resources()[resource_type]
    assert len(resource.pattern) == 1, "one pattern per resource"
    pattern = resource.pattern[0]
    variables = re.findall(r"\{(\w+)\}", pattern)
    ids = [f"{v.replace('_', '-')}-1a2b" for v in variables]
    name = pattern.format(**dict(zip(variables, ids, strict=True)))
    format_name, parse = NAMES[resource_type]
    assert parse(name) == tuple(ids)
    assert format_name(*ids) == name
    with pytest.raises(names.InvalidName):
        parse(name + "/extra")
    # AIP-123: singular is the type's name in lowerCamelCase, plural its plural, which ends in the collection.
    type_name = resource_type.split("/")[1]
    assert resource.singular == type_name[0].lower() + type_name[1:]
    assert resource.plural.lower().endswith(pattern.split("/")[-2].lower())


def test_resource_messages_have_an_identifier_name_field() -> None:
    for resource_type, (resource, msg) in _resources().items():
        if msg is None:
            continue
        name_field = msg.fields_by_name[resource.name_field or "name"]
        assert name_field.type == FieldDescriptor.TYPE_STRING, resource_type
        assert _behaviors(name_field) == [IDENTIFIER], resource_type
    assert {f.full_name for f in _fields() if IDENTIFIER in _behaviors(f)} == {
        f"{msg.full_name}.{resource.name_field or 'name'}" for resource, msg in _resources().values() if msg
    }


def test_every_reference_points_to_a_declared_resource() -> None:
    declared = set(_resources())
    for f in _fields():
        reference = _reference(f)
        if reference is None:
            continue
        assert f.type == FieldDescriptor.TYPE_STRING, f"{f.full_name}: a reference must be a string"
        assert not reference.child_type, f"{f.full_name}: no parent collections here; use type"
        if reference.type == "*":
            assert f.full_name in MULTI_TYPE_REFERENCES, f"{f.full_name}: which types does `*` accept?"
        else:
            assert reference.type in declared, f"{f.full_name} references undeclared {reference.type}"
    for field_name, types in MULTI_TYPE_REFERENCES.items():
        assert types <= declared, field_name


def test_every_field_that_names_a_resource_carries_a_reference() -> None:
    for f in _fields():
        if f.name in RESOURCE_FIELD_NAMES and f.type == FieldDescriptor.TYPE_STRING:
            assert _reference(f) is not None or _behaviors(f) == [IDENTIFIER], f"{f.full_name} has no reference"


def _target_field(method_name: str) -> tuple[str, str] | None:
    """(field, resource type) of the resource an RPC acts on, by AIP method naming."""
    match = re.fullmatch(r"(Get|Cancel|Delete|Watch)(\w+)", method_name)
    if match:
        return "name", f"visiontune.io/{match.group(2)}"
    if method_name in ("DeployModel", "UndeployModel"):
        return "model_version", "visiontune.io/ModelVersion"
    if method_name == "PromoteTrial":
        return "study", "visiontune.io/Study"
    return None


def test_the_resource_a_method_acts_on_is_required_and_referenced() -> None:
    checked = []
    for fd in (training_service_pb2.DESCRIPTOR, inference_service_pb2.DESCRIPTOR):
        for service in fd.services_by_name.values():
            for method in service.methods:
                target = _target_field(method.name)
                if target is None:
                    continue
                field = method.input_type.fields_by_name[target[0]]
                assert _behaviors(field) == [REQUIRED], field.full_name
                reference = _reference(field)
                assert reference is not None, field.full_name
                assert reference.type == target[1], field.full_name
                checked.append(method.name)
    assert {
        "GetJob",
        "CancelJob",
        "WatchJob",
        "GetStudy",
        "CancelStudy",
        "WatchStudy",
        "PromoteTrial",
        "DeployModel",
        "UndeployModel",
    } <= set(checked)


# ----------------------------------------------------------------------------------------------------- reflection


@pytest.fixture
def server(tmp_path: Path) -> Iterator[GrpcServer]:
    """The real server runtime with both v1 services (their base classes: every RPC UNIMPLEMENTED)."""
    settings = ServerSettings(host="127.0.0.1", port=0, data_dir=tmp_path, s3=S3Settings(), grace_seconds=1.0)
    bindings = [
        ServiceBinding(
            "visiontune.v1.TrainingService",
            lambda s: training_service_pb2_grpc.add_TrainingServiceServicer_to_server(
                training_service_pb2_grpc.TrainingServiceServicer(), s
            ),
        ),
        ServiceBinding(
            "visiontune.v1.InferenceService",
            lambda s: inference_service_pb2_grpc.add_InferenceServiceServicer_to_server(
                inference_service_pb2_grpc.InferenceServiceServicer(), s
            ),
        ),
    ]
    grpc_server = GrpcServer(settings, bindings, service_label="test")
    grpc_server.start()
    yield grpc_server
    grpc_server.stop(grace=0)


def _reflect(channel: grpc.Channel, **request: Any) -> list[descriptor_pb2.FileDescriptorProto]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    responses = list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(**request)]), timeout=5))
    assert len(responses) == 1
    assert not responses[0].HasField("error_response"), responses[0].error_response.error_message
    return [
        descriptor_pb2.FileDescriptorProto.FromString(b)
        for b in responses[0].file_descriptor_response.file_descriptor_proto
    ]


@pytest.mark.parametrize("service", ["visiontune.v1.TrainingService", "visiontune.v1.InferenceService"])
def test_reflection_describes_each_service_with_its_annotations(server: GrpcServer, service: str) -> None:
    files: dict[str, descriptor_pb2.FileDescriptorProto] = {}
    with make_channel(server.address) as channel:
        for proto in _reflect(channel, file_containing_symbol=service):
            files[proto.name] = proto
        # A client resolves every import, the google.api annotations included, by file name.
        pending = [d for p in files.values() for d in p.dependency]
        while pending:
            name = pending.pop()
            if name not in files:
                for proto in _reflect(channel, file_by_filename=name):
                    files[proto.name] = proto
                    pending.extend(proto.dependency)
    assert {"google/api/field_behavior.proto", "google/api/resource.proto"} <= files.keys()

    pool = descriptor_pool.DescriptorPool()
    added: set[str] = set()

    def add(name: str) -> None:
        if name not in added:
            for dependency in files[name].dependency:
                add(dependency)
            pool.Add(files[name])
            added.add(name)

    for name in files:
        add(name)
    assert pool.FindServiceByName(service).methods  # the whole closure was served

    served = {p.name: p for p in files.values()}
    file_name = (
        "visiontune/v1/training_service.proto" if "Training" in service else "visiontune/v1/inference_service.proto"
    )
    request = next(
        m
        for m in served[file_name].message_type
        if m.name == ("GetJobRequest" if "Training" in service else "UndeployModelRequest")
    )
    options = request.field[0].options
    assert list(options.Extensions[field_behavior_pb2.field_behavior]) == [REQUIRED]
    assert options.Extensions[resource_pb2.resource_reference].type in NAMES
