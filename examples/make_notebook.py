"""Build quickstart.ipynb from quickstart.py (cells separated by ``# %%`` / ``# %% [markdown]``).

    python examples/make_notebook.py            # write quickstart.ipynb (no outputs)
    python examples/make_notebook.py --execute  # ... and run it, keeping the outputs

tests/test_notebook.py checks that the two files hold the same cells and executes the notebook.
"""
from __future__ import annotations

import os
import sys

import nbformat

HERE = os.path.dirname(os.path.abspath(__file__))


def cells_from_script(path: str) -> list[tuple[str, str]]:
    """``[(kind, source)]`` with kind "markdown" or "code", in order."""
    cells: list[tuple[str, list[str]]] = []
    with open(path, encoding="utf-8") as handle:
        for line in handle.read().splitlines():
            if line.startswith("# %%"):
                cells.append(("markdown" if "[markdown]" in line else "code", []))
            elif cells:
                kind, lines = cells[-1]
                lines.append(line[2:] if kind == "markdown" and line.startswith("# ") else
                             "" if kind == "markdown" and line == "#" else line)
    return [(kind, "\n".join(lines).strip("\n")) for kind, lines in cells]


def build(execute: bool = False) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    for kind, source in cells_from_script(os.path.join(HERE, "quickstart.py")):
        nb.cells.append(nbformat.v4.new_markdown_cell(source) if kind == "markdown" else
                        nbformat.v4.new_code_cell(source))
    if execute:
        from nbclient import NotebookClient

        NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": HERE}}).execute()
    return nb


if __name__ == "__main__":
    notebook = build(execute="--execute" in sys.argv)
    for i, cell in enumerate(notebook.cells):  # stable ids: no churn when rebuilt
        cell["id"] = f"cell-{i}"
    nbformat.write(notebook, os.path.join(HERE, "quickstart.ipynb"))
