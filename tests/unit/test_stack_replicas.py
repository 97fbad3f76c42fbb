"""The pure parts of a stack with several replicas: round-robin targets, the database and replica plan, the state file,
and what the CLI makes of several replicas (channels, argument checks, metrics). Real stacks: test_stack.py."""

from __future__ import annotations

import itertools
import json
import threading
from collections.abc import Iterator
from concurrent import futures
from dataclasses import asdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import grpc
import pytest
from click.testing import CliRunner
from visiontune.cli import cli
from visiontune.cli.common import inference_target, inference_targets, trainer_target
from visiontune.client import make_channel, replica_addresses, replicas_target, round_robin
from visiontune.devstack import stack
from visiontune.devstack.stack import Component, Shape, StackError, StackState, plan_shape

_NO_ENV: dict[str, str | None] = {
    "VISIONTUNE_INFERENCE": None,
    "VISIONTUNE_INFERENCE_METRICS": None,
    "VISIONTUNE_TRAINER": None,
    "VISIONTUNE_DATA_DIR": None,
}


# -- round-robin targets ------------------------------------------------------------------------------------------


def test_one_address_is_its_own_target_and_several_are_one_round_robin_target() -> None:
    assert replicas_target(["127.0.0.1:50051"]) == "127.0.0.1:50051"
    assert replicas_target(["my-lb.example:443"]) == "my-lb.example:443"  # one name: resolved by gRPC, as before
    both = replicas_target(["127.0.0.1:50051", " 127.0.0.1:50061"])
    assert both == "ipv4:127.0.0.1:50051,127.0.0.1:50061"
    assert round_robin(both)
    assert not round_robin("127.0.0.1:50051")
    assert not round_robin("ipv4:127.0.0.1:50051")
    assert replicas_target(["[::1]:1", "[::1]:2"]) == "ipv6:[::1]:1,[::1]:2"


@pytest.mark.parametrize(
    ("addresses", "message"),
    [
        ([], "no server address"),
        (["localhost:1", "localhost:2"], "listed by IP address"),
        (["127.0.0.1:1", "[::1]:2"], "IPv4 and IPv6"),
        (["127.0.0.1", "127.0.0.1:2"], "not host:port"),
    ],
)
def test_several_addresses_must_be_ip_literals_of_one_family(addresses: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        replicas_target(addresses)


def test_an_address_list_splits_on_commas_but_a_target_with_a_scheme_is_one() -> None:
    assert replica_addresses("127.0.0.1:1, 127.0.0.1:2,") == ["127.0.0.1:1", "127.0.0.1:2"]
    assert replica_addresses("dns:///trainer.svc:50051") == ["dns:///trainer.svc:50051"]
    assert replica_addresses("ipv4:127.0.0.1:1,127.0.0.1:2") == ["ipv4:127.0.0.1:1,127.0.0.1:2"]


@pytest.fixture
def two_servers() -> Iterator[list[str]]:
    """Two gRPC servers on loopback whose one method answers with the server's name."""
    servers = []
    addresses = []
    for name in ("a", "b"):
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        handler = grpc.unary_unary_rpc_method_handler(lambda _req, _ctx, name=name: name.encode())
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Who", {"Am": handler}),))
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        servers.append(server)
        addresses.append(f"127.0.0.1:{port}")
    yield addresses
    for server in servers:
        server.stop(grace=None)


def test_a_channel_to_several_replicas_takes_turns(two_servers: list[str]) -> None:
    with make_channel(replicas_target(two_servers)) as channel:
        who = channel.unary_unary("/test.Who/Am", request_serializer=None, response_deserializer=None)
        grpc.channel_ready_future(channel).result(timeout=10)
        answers = [who(b"", timeout=5, wait_for_ready=True) for _ in range(20)]
    # Round-robin reaches both replicas (pick_first, gRPC's default, would answer from one only).
    assert set(answers) == {b"a", b"b"}
    # Once both are connected, calls alternate.
    tail = answers[-6:]
    assert all(x != y for x, y in itertools.pairwise(tail)), answers


# -- the plan: database and replicas ------------------------------------------------------------------------------


def test_the_default_stack_is_one_of_each_on_sqlite() -> None:
    assert plan_shape(None, None, None, remembered=None) == (Shape("sqlite", 1, 1), [])
    assert stack.DEFAULT_DATABASE == "sqlite"


def test_several_replicas_imply_postgresql_and_say_so() -> None:
    shape, notes = plan_shape(None, 2, None, remembered=None)
    assert shape == Shape("postgresql", 2, 1)
    assert notes == [
        "--trainer-replicas 2: the replicas share the job database and the prediction store, so the stack runs "
        "them on PostgreSQL (--database postgresql)"
    ]
    shape, notes = plan_shape(None, None, 3, remembered="sqlite")
    assert shape == Shape("postgresql", 1, 3)
    assert "--inference-replicas 3" in notes[0]


def test_several_replicas_on_sqlite_are_refused_naming_the_flag() -> None:
    with pytest.raises(StackError, match=r"^--trainer-replicas 2 and --inference-replicas 2 needs --database post"):
        plan_shape("sqlite", 2, 2, remembered=None)
    with pytest.raises(StackError, match=r"--trainer-replicas must be at least 1, got 0"):
        plan_shape(None, 0, None, remembered=None)
    with pytest.raises(StackError, match=r"--database must be one of sqlite, postgresql"):
        plan_shape("mysql", None, None, remembered=None)


def test_the_remembered_database_is_used_unless_another_is_asked_for() -> None:
    assert plan_shape(None, None, None, remembered="postgresql") == (
        Shape("postgresql", 1, 1),
        ["database: postgresql, as the last `visiontune up` (--database sqlite switches)"],
    )
    assert plan_shape("sqlite", None, None, remembered="postgresql") == (Shape("sqlite", 1, 1), [])


def test_a_switch_says_where_the_old_records_stay(tmp_path: Path) -> None:
    assert stack.switch_note(tmp_path, "sqlite", "postgresql") is None  # nothing recorded yet: nothing to say
    jobs = tmp_path / "trainer" / "jobs.sqlite3"
    jobs.parent.mkdir()
    jobs.touch()
    note = stack.switch_note(tmp_path, "sqlite", "postgresql")
    assert note == (
        f"switching the stack's database from sqlite to postgresql: the jobs, studies and feedback recorded in "
        f"sqlite ({jobs}) stay there, unused and not copied; `visiontune up --database sqlite` goes back to them. "
        "Datasets, models and deployments are in S3 and stay."
    )
    assert stack.switch_note(tmp_path, "sqlite", "sqlite") is None


def test_a_running_stack_is_not_reshaped_by_up() -> None:
    running = Shape("postgresql", 2, 2)
    assert stack.shape_conflict(running, None, None, None) == ""
    assert stack.shape_conflict(running, "postgresql", 2, None) == ""
    assert stack.shape_conflict(running, "sqlite", 2, 1) == "--database sqlite --inference-replicas 1"


def test_replica_names_and_data_directories(tmp_path: Path) -> None:
    assert stack.replica_names("trainer", 1) == ["trainer"]  # a one-replica stack keeps its names
    assert stack.replica_names("inference", 2) == ["inference-1", "inference-2"]
    assert stack.replica_data_dir(tmp_path, "inference", 1) == tmp_path
    assert stack.replica_data_dir(tmp_path, "inference", 2) == tmp_path / "replicas" / "inference-2"


def test_a_state_file_from_before_replicas_reads_as_one_of_each_on_sqlite(tmp_path: Path) -> None:
    path = stack.state_path(tmp_path)
    path.parent.mkdir(parents=True)
    old = {
        "data_dir": str(tmp_path),
        "s3": {"endpoint": "127.0.0.1:9000", "access_key": "a", "secret_key": "s", "bucket": "b"},
        "components": [
            {"name": name, "pid": 1, "port": port, "log": "", "marker": "x", "grpc_service": None, "endpoints": {}}
            for name, port in (("s3", 9000), ("trainer", 50051), ("inference", 50052))
        ],
    }
    path.write_text(json.dumps(old))
    state = stack.load_state(tmp_path)
    assert state is not None
    assert [c.role for c in state.components] == ["s3", "trainer", "inference"]
    assert state.shape == Shape("sqlite", 1, 1)


# -- the CLI with several replicas ----------------------------------------------------------------------------------


def _write_state(data_dir: Path, metrics: list[str] | None = None) -> StackState:
    """A recorded stack of two trainers and two inference replicas (nothing runs: the CLI only reads the record)."""
    components = [Component("s3", 1, 9000, "", "x")]
    components += [Component(f"trainer-{i}", 1, 50050 + i, "", "x", role="trainer") for i in (1, 2)]
    for i in (1, 2):
        urls = {"metrics": metrics[i - 1]} if metrics else {}
        components.append(Component(f"inference-{i}", 1, 50060 + i, "", "x", endpoints=urls, role="inference"))
    s3: dict[str, object] = {"endpoint": "127.0.0.1:9000", "access_key": "a", "secret_key": "s", "bucket": "b"}
    state = StackState(str(data_dir), s3, components, database="postgresql")
    path = stack.state_path(data_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(asdict(state)))
    return state


def test_the_cli_reaches_every_recorded_replica_through_one_target(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in _NO_ENV:
        monkeypatch.delenv(name, raising=False)
    _write_state(tmp_path)
    assert trainer_target(tmp_path) == "ipv4:127.0.0.1:50051,127.0.0.1:50052"
    assert inference_targets(tmp_path) == ["127.0.0.1:50061", "127.0.0.1:50062"]
    assert inference_target(tmp_path) == "ipv4:127.0.0.1:50061,127.0.0.1:50062"
    monkeypatch.setenv("VISIONTUNE_INFERENCE", "10.0.0.1:1,10.0.0.2:1")
    assert inference_target(tmp_path) == "ipv4:10.0.0.1:1,10.0.0.2:1"
    monkeypatch.setenv("VISIONTUNE_TRAINER", "a.example:1,b.example:1")
    with pytest.raises(Exception, match=r"VISIONTUNE_TRAINER: 'a.example:1': several replicas are listed by IP"):
        trainer_target(tmp_path)


def test_up_refuses_several_replicas_on_sqlite_before_starting_anything(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        cli,
        ["up", "--data-dir", str(tmp_path), "--database", "sqlite", "--trainer-replicas", "2"],
        env=_NO_ENV,
    )
    assert result.exit_code == 1
    assert result.stderr.startswith("Error: --trainer-replicas 2 needs --database postgresql: ")
    assert not (tmp_path / "stack").exists()
    zero = CliRunner().invoke(cli, ["up", "--data-dir", str(tmp_path), "--inference-replicas", "0"], env=_NO_ENV)
    assert zero.exit_code == 2
    assert "--inference-replicas" in zero.stderr


class _Metrics(BaseHTTPRequestHandler):
    body = b""

    def do_GET(self) -> None:
        self.send_response(200)
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, format: str, *args: object) -> None:
        return


@pytest.fixture
def two_metrics_endpoints() -> Iterator[list[str]]:
    urls = []
    servers = []
    for n in (1, 2):
        body = (
            "# TYPE visiontune_inference_requests_total counter\n"
            f'visiontune_inference_requests_total{{code="OK",model="m",version="v"}} {n}.0\n'
            "# TYPE visiontune_inference_unknown_false_positive_rate gauge\n"
            f'visiontune_inference_unknown_false_positive_rate{{model="m",version="v"}} 0.{n}\n'
        ).encode()
        handler = type(f"Metrics{n}", (_Metrics,), {"body": body})
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        urls.append(f"http://127.0.0.1:{server.server_address[1]}/metrics")
    yield urls
    for server in servers:
        server.shutdown()
        server.server_close()


def test_metrics_of_several_replicas_are_shown_per_replica(tmp_path: Path, two_metrics_endpoints: list[str]) -> None:
    _write_state(tmp_path, metrics=two_metrics_endpoints)
    result = CliRunner().invoke(cli, ["metrics", "--grep", "requests", "--data-dir", str(tmp_path)], env=_NO_ENV)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[:2] == [
        'inference-1  visiontune_inference_requests_total{code="OK",model="m",version="v"}  1.0',
        'inference-2  visiontune_inference_requests_total{code="OK",model="m",version="v"}  2.0',
    ]
    assert lines[2].startswith(f"(2 samples from 2 replicas: inference-1 {two_metrics_endpoints[0]}, inference-2 ")
    assert "the fleet's count is a counter's sum over the replicas" in lines[2]

    one = CliRunner().invoke(
        cli, ["metrics", "--grep", "rate"], env={**_NO_ENV, "VISIONTUNE_INFERENCE_METRICS": two_metrics_endpoints[0]}
    )
    assert one.stdout.splitlines() == [  # one replica: the output it always had
        'visiontune_inference_unknown_false_positive_rate{model="m",version="v"}  0.1',
        f"(1 sample from {two_metrics_endpoints[0]})",
    ]
