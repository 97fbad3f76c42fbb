"""Specs may read only from the allowed input locations, and never from the service's own prefixes."""

from __future__ import annotations

import pytest
from trainer_service.spec.validate import SpecInvalid, validate_spec
from trainer_service.tuning.study_config import validate_study
from visiontune.uris import SERVICE_PREFIXES, InputLocations, S3Location
from visiontune.v1 import study_pb2
from visiontune.v1 import training_spec_pb2 as pb

BUCKET = "art"
DEFAULT = InputLocations.default(BUCKET)


def _spec(**dataset: str) -> pb.TrainingSpec:
    return pb.TrainingSpec(dataset=pb.DatasetSpec(uri=dataset.pop("uri", "datasets/cats"), **dataset))


def _violations(spec: pb.TrainingSpec, inputs: InputLocations = DEFAULT) -> dict[str, str]:
    with pytest.raises(SpecInvalid) as info:
        validate_spec(spec, default_bucket=BUCKET, inputs=inputs)
    return {v.field: v.description for v in info.value.violations}


def test_the_default_allows_the_artifact_buckets_datasets_folder_only() -> None:
    assert DEFAULT.allowed == (S3Location(BUCKET, "datasets/"),)
    assert DEFAULT.problem(S3Location(BUCKET, "datasets/cats/")) is None
    assert DEFAULT.problem(S3Location(BUCKET, "datasets/")) is None
    assert "allowed input location" in (DEFAULT.problem(S3Location(BUCKET, "datasetsx/")) or "")
    assert "allowed input location" in (DEFAULT.problem(S3Location("other", "datasets/cats/")) or "")


@pytest.mark.parametrize("own", SERVICE_PREFIXES)
def test_the_services_own_prefixes_are_never_inputs_even_when_allowed(own: str) -> None:
    everything = InputLocations.parse(f"s3://{BUCKET}/", artifact_bucket=BUCKET)
    problem = everything.problem(S3Location(BUCKET, f"{own}x/"))
    assert problem is not None
    assert f"own {own} prefix" in problem
    # Another bucket's folder of the same name is just a folder.
    assert InputLocations.parse("s3://other/", artifact_bucket=BUCKET).problem(S3Location("other", own)) is None


def test_dot_segments_are_refused_where_a_normalising_server_would_escape() -> None:
    for prefix in ("datasets/../jobs/x/", "datasets/./cats/", "datasets//cats/"):
        assert "segments" in (DEFAULT.problem(S3Location(BUCKET, prefix)) or "")
    with pytest.raises(ValueError, match="segments"):
        InputLocations.parse("datasets/../jobs/", artifact_bucket=BUCKET)


def test_parse_takes_a_comma_separated_list_and_bare_prefixes_live_in_the_artifact_bucket() -> None:
    inputs = InputLocations.parse(" datasets/ , s3://shared/corpora ,weights/", artifact_bucket=BUCKET)
    assert inputs.allowed == (
        S3Location(BUCKET, "datasets/"),
        S3Location("shared", "corpora/"),
        S3Location(BUCKET, "weights/"),
    )
    assert InputLocations.parse(["", " "], artifact_bucket=BUCKET) == DEFAULT
    with pytest.raises(ValueError, match="only s3://"):
        InputLocations.parse("http://x/y", artifact_bucket=BUCKET)


def test_every_uri_field_outside_the_allowed_locations_is_its_own_violation() -> None:
    spec = _spec(
        uri="jobs/other-job/",
        validation_uri="models/m/versions/1/",
        test_uri="s3://another-bucket/test/",
        unknown_uri="datasets/../studies/s/",
    )
    spec.model.weights = pb.WEIGHTS_SOURCE_URI
    spec.model.weights_uri = "weights/resnet.pt"
    found = _violations(spec)
    assert set(found) == {
        "dataset.uri",
        "dataset.validation_uri",
        "dataset.test_uri",
        "dataset.unknown_uri",
        "model.weights_uri",
    }
    assert "own jobs/ prefix" in found["dataset.uri"]
    assert "own models/ prefix" in found["dataset.validation_uri"]
    assert "s3://art/datasets/" in found["dataset.test_uri"]
    assert "segments" in found["dataset.unknown_uri"]
    assert "allowed input location" in found["model.weights_uri"]


def test_a_configured_location_admits_its_objects_and_nothing_beside_them() -> None:
    inputs = InputLocations.parse("datasets/,s3://shared/weights/", artifact_bucket=BUCKET)
    spec = _spec()
    spec.model.weights = pb.WEIGHTS_SOURCE_URI
    spec.model.weights_uri = "s3://shared/weights/resnet.pt"
    assert validate_spec(spec, default_bucket=BUCKET, inputs=inputs).model.weights_uri == spec.model.weights_uri
    spec.model.weights_uri = "s3://shared/weights-evil/resnet.pt"
    assert set(_violations(spec, inputs)) == {"model.weights_uri"}


def test_without_inputs_a_stored_spec_is_not_confined() -> None:
    # The worker re-reads specs that were confined when accepted; a later change of the setting must not fail them.
    assert validate_spec(_spec(uri="s3://elsewhere/cats/"), default_bucket=BUCKET).dataset.uri == "s3://elsewhere/cats/"


def test_a_study_is_confined_in_its_base_spec() -> None:
    study = study_pb2.StudySpec(base_spec=_spec(uri="jobs/x/"))
    study.parameters.add(path="classifier.learning_rate").float_range.CopyFrom(study_pb2.FloatRange(min=1e-4, max=1e-2))
    with pytest.raises(SpecInvalid) as info:
        validate_study(study, default_bucket=BUCKET, inputs=DEFAULT)
    assert "spec.base_spec.dataset.uri" in {v.field for v in info.value.violations}

    # A URI is a string field, which a search cannot vary: the base spec is the only way one gets in.
    searched = study_pb2.StudySpec(base_spec=_spec())
    searched.parameters.add(path="dataset.uri").categorical.values.extend(["datasets/a", "models/m/"])
    with pytest.raises(SpecInvalid) as info:
        validate_study(searched, default_bucket=BUCKET, inputs=DEFAULT)
    assert "string field" in {v.field: v.description for v in info.value.violations}["spec.parameters[0].path"]


def test_weights_sha256_is_checked_for_shape_and_only_goes_with_uri_weights() -> None:
    spec = _spec()
    spec.model.weights = pb.WEIGHTS_SOURCE_URI
    spec.model.weights_uri = "datasets/w.pt"
    spec.model.weights_sha256 = "AB" * 32
    assert validate_spec(spec, default_bucket=BUCKET, inputs=DEFAULT).model.weights_sha256 == "ab" * 32
    spec.model.weights_sha256 = "not-a-digest"
    assert "64 hex digits" in _violations(spec)["model.weights_sha256"]
    spec.model.weights = pb.WEIGHTS_SOURCE_NONE
    spec.model.weights_uri = ""
    spec.model.weights_sha256 = "ab" * 32
    assert "must be empty" in _violations(spec)["model.weights_sha256"]
