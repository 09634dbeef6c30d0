"""Check that no package imports a layer above it.

The layers, bottom up: `aggregates` (standard library only), `store` (may add
`aggregates` and third-party packages, but never `pipeline` or Ray), and
`pipeline` (anything). No package imports the tests. Every `.py` file under the
three package folders is parsed, so a module that is never imported at run
time is checked too.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("aggregates", "store", "pipeline")


@dataclass(frozen=True)
class ImportSite:
    """One imported top-level module and where the import statement is."""

    path: Path
    line: int
    module: str


def find_imports(path: Path) -> list[ImportSite]:
    """Parse one file and list the top-level module of each absolute import.

    Relative imports stay inside their own package and are left out. Calls of
    `importlib.import_module` and `__import__` with a literal name count too.

    Raises:
        SyntaxError: the file does not parse.
    """
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    sites: list[ImportSite] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                sites.append(ImportSite(path, node.lineno, top_level_name(alias.name)))
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0 and node.module is not None:
                sites.append(ImportSite(path, node.lineno, top_level_name(node.module)))
        elif isinstance(node, ast.Call):
            name = literal_dynamic_import(node)
            if name is not None:
                sites.append(ImportSite(path, node.lineno, top_level_name(name)))
    return sites


def top_level_name(module: str) -> str:
    return module.split(".", 1)[0]


def literal_dynamic_import(call: ast.Call) -> str | None:
    """Return the module name of `import_module("x")` or `__import__("x")`."""
    function = call.func
    if isinstance(function, ast.Attribute):
        function_name = function.attr
    elif isinstance(function, ast.Name):
        function_name = function.id
    else:
        return None

    if function_name not in ("import_module", "__import__") or not call.args:
        return None
    first_argument = call.args[0]
    if isinstance(first_argument, ast.Constant) and isinstance(
        first_argument.value, str
    ):
        # import_module(".name", package) is relative and stays in its package.
        if first_argument.value.startswith("."):
            return None
        return first_argument.value
    return None


def layer_violation(package: str, module: str) -> str | None:
    """Return why `package` must not import `module`, or None if it may."""
    if module == "tests":
        return "package code must not import the tests"
    if package == "aggregates":
        if module == "aggregates" or module in sys.stdlib_module_names:
            return None
        return "aggregates may import only the standard library and aggregates"
    if package == "store":
        if module in ("pipeline", "ray"):
            return "store must not import pipeline or ray"
        return None
    return None


def find_violations(root: Path, package: str) -> list[str]:
    """List every forbidden import under `root/package` as `file:line: reason`."""
    violations: list[str] = []
    for path in sorted((root / package).rglob("*.py")):
        relative_path = path.relative_to(root)
        try:
            sites = find_imports(path)
        except SyntaxError as err:
            violations.append(f"{relative_path}:{err.lineno}: does not parse: {err}")
            continue

        for site in sites:
            reason = layer_violation(package, site.module)
            if reason is not None:
                violations.append(
                    f"{relative_path}:{site.line}: imports {site.module!r}, "
                    f"but {reason}"
                )
    return violations


@pytest.mark.parametrize("package", PACKAGES)
def test_package_imports_stay_in_layer(package: str) -> None:
    violations = find_violations(REPO_ROOT, package)

    assert not violations, "upward imports:\n" + "\n".join(violations)


@pytest.mark.parametrize(
    ("package", "source", "expected_module"),
    [
        ("aggregates", "import store\n", "store"),
        ("aggregates", "from pipeline.config import Config\n", "pipeline"),
        ("aggregates", "import ray\n", "ray"),
        ("aggregates", "import sqlalchemy as sa\n", "sqlalchemy"),
        ("aggregates", "def load():\n    import fsspec\n", "fsspec"),
        ("aggregates", "import importlib\nimportlib.import_module('ray')\n", "ray"),
        ("store", "from pipeline import cli\n", "pipeline"),
        ("store", "import ray.util.metrics\n", "ray"),
        ("store", "import typing\nif typing.TYPE_CHECKING:\n    import ray\n", "ray"),
        ("pipeline", "from tests.services import KafkaBroker\n", "tests"),
    ],
)
def test_checker_flags_upward_import(
    tmp_path: Path, package: str, source: str, expected_module: str
) -> None:
    (tmp_path / package).mkdir()
    (tmp_path / package / "module.py").write_text(source)

    violations = find_violations(tmp_path, package)

    assert len(violations) == 1
    assert violations[0].startswith(f"{package}/module.py:")
    assert f"imports {expected_module!r}" in violations[0]


@pytest.mark.parametrize(
    ("package", "source"),
    [
        ("aggregates", "from __future__ import annotations\nimport dataclasses\n"),
        ("aggregates", "from aggregates.errors import DomainError\n"),
        ("aggregates", "from . import errors\nfrom .shop import Shop\n"),
        ("store", "import sqlalchemy\nimport fsspec\nfrom aggregates import Shop\n"),
        (
            "store",
            "from importlib import import_module\nimport_module('.codec', 'store')\n",
        ),
        ("pipeline", "import ray\nimport kafka\nfrom store import EventStore\n"),
    ],
)
def test_checker_allows_import(tmp_path: Path, package: str, source: str) -> None:
    (tmp_path / package).mkdir()
    (tmp_path / package / "module.py").write_text(source)

    assert find_violations(tmp_path, package) == []


def test_checker_reports_unparsable_file(tmp_path: Path) -> None:
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / "broken.py").write_text("def broken(:\n")

    violations = find_violations(tmp_path, "store")

    assert len(violations) == 1
    assert violations[0].startswith("store/broken.py:1: does not parse")


def test_checker_accepts_missing_package(tmp_path: Path) -> None:
    assert find_violations(tmp_path, "pipeline") == []
