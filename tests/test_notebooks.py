"""Run each notebook top to bottom on small data, failing on any cell that raises.

Notebooks are executed with nbclient in the python3 kernel of the running
interpreter, with the kernel's working folder set to ``notebooks/`` as Jupyter
sets it. A cell inserted after the cell tagged ``parameters`` overrides the
parameters (row limit, work folder), as papermill does. The executed copy is
written to the test's temporary folder, so the committed notebooks keep no
outputs.
"""

from __future__ import annotations

import ast
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbformat import NotebookNode

REPO_ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS_DIR = REPO_ROOT / "notebooks"
NOTEBOOK_NAMES = ["explore_events.ipynb", "lifespans_and_memory.ipynb"]
KERNEL_NAME = "python3"
CELL_TIMEOUT_S = 600
# Project packages a notebook may import. Pipeline code runs through the CLI.
ALLOWED_PROJECT_PACKAGES = {"aggregates", "store"}
PROJECT_PACKAGES = {"aggregates", "store", "pipeline", "tests"}
EXPLORE_ROW_LIMIT = 5_000


def read_notebook(name: str) -> NotebookNode:
    return nbformat.read(NOTEBOOKS_DIR / name, as_version=4)


def execute_notebook(name: str, parameters: str, executed_dir: Path) -> NotebookNode:
    """Execute a copy of a notebook with ``parameters`` injected and return it.

    The executed copy is also written to ``executed_dir`` for inspection after
    a failure. A cell that raises makes nbclient raise CellExecutionError,
    with the cell's source and traceback in its message.
    """
    notebook = read_notebook(name)
    [index] = [
        position
        for position, cell in enumerate(notebook.cells)
        if "parameters" in cell.metadata.get("tags", [])
    ]
    injected = nbformat.v4.new_code_cell(parameters)
    injected.metadata["tags"] = ["injected-parameters"]
    notebook.cells.insert(index + 1, injected)

    client = NotebookClient(
        notebook,
        timeout=CELL_TIMEOUT_S,
        kernel_name=KERNEL_NAME,
        resources={"metadata": {"path": str(NOTEBOOKS_DIR)}},
    )
    try:
        client.execute()
    finally:
        nbformat.write(notebook, executed_dir / name)
    return notebook


def output_text(notebook: NotebookNode) -> str:
    """Return the text that every code cell printed or displayed, joined."""
    parts = []
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            if output.output_type == "stream":
                parts.append(output.text)
            elif output.output_type in ("execute_result", "display_data"):
                parts.append(output.data.get("text/plain", ""))
    return "\n".join(parts)


def count_images(notebook: NotebookNode) -> int:
    return sum(
        1
        for cell in notebook.cells
        for output in cell.get("outputs", [])
        if output.output_type == "display_data" and "image/png" in output.data
    )


def imported_packages(source: str) -> set[str]:
    """Return the top-level packages that a code cell imports."""
    # Lines starting with % or ! are IPython magics, not Python.
    python = "\n".join(
        line for line in source.splitlines() if not line.lstrip().startswith(("%", "!"))
    )
    packages = set()
    for node in ast.walk(ast.parse(python)):
        if isinstance(node, ast.Import):
            packages.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            packages.add(node.module.split(".")[0])
    return packages


@pytest.mark.parametrize("name", NOTEBOOK_NAMES)
def test_notebook_saved_without_outputs(name: str) -> None:
    notebook = read_notebook(name)

    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{name}: a code cell has outputs"
            assert cell.execution_count is None, f"{name}: a code cell has a count"


@pytest.mark.parametrize("name", NOTEBOOK_NAMES)
def test_notebook_imports_only_aggregates_and_store(name: str) -> None:
    notebook = read_notebook(name)

    imported = set()
    for cell in notebook.cells:
        if cell.cell_type == "code":
            imported |= imported_packages(cell.source)

    assert imported & PROJECT_PACKAGES <= ALLOWED_PROJECT_PACKAGES


@pytest.mark.parametrize("name", NOTEBOOK_NAMES)
def test_notebook_has_one_parameters_cell(name: str) -> None:
    notebook = read_notebook(name)

    tagged = [c for c in notebook.cells if "parameters" in c.metadata.get("tags", [])]

    assert len(tagged) == 1
    assert tagged[0].cell_type == "code"


def test_explore_events_runs(retail_parquet: Path, tmp_path: Path) -> None:
    """The retail notebook backfills 5,000 rows and its own asserts pass."""
    parameters = (
        f"ROW_LIMIT = {EXPLORE_ROW_LIMIT}\n"
        f"WORK_DIR = {str(tmp_path / 'explore')!r}\n"
        f"SOURCE_PATH = {str(retail_parquet)!r}\n"
    )

    notebook = execute_notebook("explore_events.ipynb", parameters, tmp_path)

    text = output_text(notebook)
    assert f"rows: {EXPLORE_ROW_LIMIT:,}" in text
    assert "store agrees with the source" in text
    assert count_images(notebook) == 3
    assert (tmp_path / "explore" / "events.db").is_file()


def test_lifespans_and_memory_runs(tmp_path: Path) -> None:
    """The lifespans notebook runs the three variants at small scale and plots them."""
    out_dir = tmp_path / "bench"
    parameters = f'SCALE = "small"\nRUNS = 1\nOUT_DIR = {str(out_dir)!r}\n'

    notebook = execute_notebook("lifespans_and_memory.ipynb", parameters, tmp_path)

    sample_files = sorted(out_dir.glob("*/samples.jsonl"))
    assert len(sample_files) == 3
    for path in sample_files:
        assert path.stat().st_size > 0, f"{path} is empty"
    assert count_images(notebook) == 2
