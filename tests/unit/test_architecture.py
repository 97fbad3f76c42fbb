"""Who may import whom (docs/architecture.md §1), checked on the source with `ast`, so no module is imported.

Every `import x` and `from x import y` counts, wherever it stands: at the top, inside a function, under
`if TYPE_CHECKING:`; relative imports are resolved, and `importlib.import_module("x")` with a literal name counts
too. A failure lists every offending `file:line module`.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import pytest

REPO = Path(__file__).resolve().parents[2]

# -- the rules ----------------------------------------------------------------------------------------------------
#
# | modules in                | must not import                                                                  |
# |---------------------------|----------------------------------------------------------------------------------|
# | trainer_service           | inference_service                                                                |
# | inference_service         | trainer_service                                                                  |
# | visiontune                | trainer_service, inference_service                                               |
# | all but the client side   | the client side: visiontune.cli, visiontune.devstack (what starts local servers)  |
# | trainer_service.engine    | anything but ENGINE_MAY_IMPORT: no S3 (minio, visiontune.store, visiontune.uris),|
# |                           | no gRPC or protobuf stubs (grpc, visiontune.v1), no job store (sqlite3,          |
# |                           | trainer_service.jobs)                                                            |

FORBIDDEN: Final[tuple[tuple[str, tuple[str, ...]], ...]] = (
    ("trainer_service", ("inference_service",)),
    ("inference_service", ("trainer_service",)),
    ("visiontune", ("trainer_service", "inference_service")),
)
# The CLI and the local development stack: they may import the library, nothing else may import them.
CLIENT_SIDE: Final = ("visiontune.cli", "visiontune.devstack")

ENGINE: Final = "trainer_service.engine"
# The engine is plain PyTorch over a typed config: the standard library (but the job store's sqlite3), torch and
# friends, its own modules, the typed config, and the shared pure helpers.
ENGINE_MAY_IMPORT: Final = (
    "torch",
    "torchvision",
    "numpy",
    "PIL",
    "matplotlib",
    "trainer_service.engine",
    "trainer_service.spec.config",
    "visiontune.preprocessing",
    "visiontune.openset",
    "visiontune.float32",
    "visiontune.errors",
    "visiontune.weights_cache",
)
ENGINE_MAY_NOT_IMPORT_STDLIB: Final = ("sqlite3",)

PACKAGES: Final = ("trainer_service", "inference_service", "visiontune")


# -- reading imports ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Import:
    line: int
    module: str  # the module as written, relative imports resolved
    candidates: tuple[str, ...]  # `module`, and `module.name` for each name of a `from module import name`


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _resolve(module: str | None, level: int, importer: str, is_package: bool) -> str:
    if level == 0:
        return module or ""
    parts = importer.split(".") if is_package else importer.split(".")[:-1]
    base = parts[: len(parts) - (level - 1)] if level > 1 else parts
    return ".".join([*base, module] if module else base)


def _literal_import_call(node: ast.Call) -> str | None:
    """The module of `importlib.import_module("x")` or `__import__("x")` with a literal name."""
    func = node.func
    named = (isinstance(func, ast.Attribute) and func.attr == "import_module") or (
        isinstance(func, ast.Name) and func.id in {"import_module", "__import__"}
    )
    if named and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
        return node.args[0].value
    return None


def imports_of(source: str, importer: str, *, is_package: bool = False) -> Iterator[Import]:
    """Every import in `source`, the module `importer` (a package's `__init__` when `is_package`)."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(node.lineno, alias.name, (alias.name,))
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(node.module, node.level, importer, is_package)
            names = tuple(f"{base}.{alias.name}" for alias in node.names if alias.name != "*")
            yield Import(node.lineno, base, (base, *names))
        elif isinstance(node, ast.Call) and (literal := _literal_import_call(node)) is not None:
            yield Import(node.lineno, literal, (literal,))


def _module_name(path: Path) -> tuple[str, bool]:
    parts = path.relative_to(REPO).with_suffix("").parts
    if parts[-1] == "__init__":
        return ".".join(parts[:-1]), True
    return ".".join(parts), False


def _sources() -> Iterator[tuple[Path, str, bool]]:
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            name, is_package = _module_name(path)
            yield path, name, is_package


# -- checking -----------------------------------------------------------------------------------------------------


def forbidden_imports(importer: str, found: Import) -> list[str]:
    """The modules `found` brings in against FORBIDDEN: the module itself, or the names taken from it."""
    banned = [b for where, bs in FORBIDDEN if _within(importer, where) for b in bs]
    if not any(_within(importer, side) for side in CLIENT_SIDE):
        banned += CLIENT_SIDE
    if any(_within(found.module, b) for b in banned):
        return [found.module]
    return [c for c in found.candidates[1:] if any(_within(c, b) for b in banned)]


def _engine_may_import(module: str) -> bool:
    top = module.split(".")[0]
    if top in sys.stdlib_module_names:
        return top not in ENGINE_MAY_NOT_IMPORT_STDLIB
    return any(_within(module, allowed) for allowed in ENGINE_MAY_IMPORT)


def engine_violations(importer: str, found: Import) -> list[str]:
    """The modules `found` brings into the engine beyond ENGINE_MAY_IMPORT ([] outside the engine)."""
    if not _within(importer, ENGINE):
        return []
    if _engine_may_import(found.module):
        return []
    if any(allowed.startswith(found.module + ".") for allowed in ENGINE_MAY_IMPORT):
        # `from trainer_service.spec import config`: the package is not allowed, some of its submodules are.
        return [name for name in found.candidates[1:] if not _engine_may_import(name)]
    return [found.module]


def _violations() -> list[str]:
    lines: list[str] = []
    for path, importer, is_package in _sources():
        for found in imports_of(path.read_text(), importer, is_package=is_package):
            for module in forbidden_imports(importer, found) + engine_violations(importer, found):
                lines.append(f"{path.relative_to(REPO)}:{found.line} {module}")
    return sorted(set(lines))


def test_the_import_rules_hold() -> None:
    lines = _violations()
    assert not lines, "imports against docs/architecture.md §1:\n" + "\n".join(lines)


def test_every_package_is_scanned() -> None:
    modules = {name for _, name, _ in _sources()}
    assert {
        "trainer_service.engine.loop",
        "trainer_service.jobs.worker",
        "inference_service.engine",
        "visiontune.store",
    } <= modules
    assert "trainer_service.engine" in modules  # a package's __init__ counts as the package


# -- the checker itself: every way of importing is caught --------------------------------------------------------

_ENGINE_MODULE = "trainer_service.engine.loop"


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("import minio\n", ["minio"]),
        ("import grpc.aio as aio\n", ["grpc.aio"]),
        ("import sqlite3\n", ["sqlite3"]),
        ("from visiontune.store import ArtifactStore\n", ["visiontune.store"]),
        ("from visiontune import preprocessing, store\n", ["visiontune.store"]),
        ("from visiontune.v1 import job_pb2\n", ["visiontune.v1"]),
        ("from ..jobs import store\n", ["trainer_service.jobs"]),
        ("from trainer_service.spec import validate\n", ["trainer_service.spec.validate"]),
        ("from trainer_service import jobs\n", ["trainer_service.jobs"]),
        ("def f():\n    from trainer_service.jobs.store import JobStore\n", ["trainer_service.jobs.store"]),
        (
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from visiontune.uris import S3Location\n",
            ["visiontune.uris"],
        ),
        ("import importlib\nm = importlib.import_module('minio')\n", ["minio"]),
    ],
)
def test_a_forbidden_engine_import_is_caught_however_it_is_written(source: str, expected: list[str]) -> None:
    found = [m for i in imports_of(source, _ENGINE_MODULE) for m in engine_violations(_ENGINE_MODULE, i)]
    assert found == expected


@pytest.mark.parametrize(
    "source",
    [
        "import os.path\nimport torch.nn.functional as F\n",
        "from torchvision.transforms import v2\n",
        "import numpy.typing as npt\nfrom PIL import Image\nimport matplotlib\n",
        "from trainer_service.spec.config import StageConfig\nfrom trainer_service.spec import config\n",
        "from visiontune import float32, openset, preprocessing\n",
        "from . import models\nfrom .batches import Split\nfrom trainer_service.engine import plots\n",
        "from __future__ import annotations\n",
    ],
)
def test_allowed_engine_imports_pass(source: str) -> None:
    assert [m for i in imports_of(source, _ENGINE_MODULE) for m in engine_violations(_ENGINE_MODULE, i)] == []


@pytest.mark.parametrize(
    ("importer", "source", "expected"),
    [
        (
            "trainer_service.servicer",
            "from inference_service.engine import InferenceEngine\n",
            ["inference_service.engine"],
        ),
        (
            "inference_service.engine",
            "def f():\n    import trainer_service.engine.models\n",
            ["trainer_service.engine.models"],
        ),
        ("visiontune.store", "from trainer_service import jobs\n", ["trainer_service"]),
        ("visiontune", "from . import names\nimport inference_service\n", ["inference_service"]),
        ("visiontune.client", "from visiontune.v1 import job_pb2\nimport torch\n", []),
        (
            "trainer_service.jobs.executor",
            "from visiontune.devstack.ports import free_port\n",
            ["visiontune.devstack.ports"],
        ),
        ("visiontune.store", "from visiontune import cli\n", ["visiontune.cli"]),
        ("visiontune.cli.stack", "from visiontune.devstack import stack\nfrom visiontune.store import MANIFEST\n", []),
    ],
)
def test_forbidden_imports_between_the_parts(importer: str, source: str, expected: list[str]) -> None:
    found = [
        m for i in imports_of(source, importer, is_package="." not in importer) for m in forbidden_imports(importer, i)
    ]
    assert found == expected


def test_test_modules_have_unique_names() -> None:
    # tests/unit and tests/integration are not packages: pytest imports each file by its basename, and a second
    # file of the same name stops the whole collection ("import file mismatch").
    names = sorted(p.name for p in (REPO / "tests").rglob("test_*.py"))
    assert [n for n in set(names) if names.count(n) > 1] == []
