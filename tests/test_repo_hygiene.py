"""The repository's own consistency: every file the code and docs cite exists, and the Python
package's modules import one another without a circle (the data path runs one way:
layers → autograd / compiled → backend → ops / cuda → _C / _C_cuda)."""
from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "python" / "lorafuse"
# a repository path to a source or doc file: top-level folder, then a name with one of these extensions
CITED = re.compile(r"(?<![\w./-])((?:kernels|csrc|python|tests|benchmarks|docs|examples|fuzz|scripts)/[\w./-]*?"
                   r"\.(?:py|c|h|cu|cpp|md|sh|ipynb|toml))(?![\w*])")
TEXT_SUFFIXES = (".md", ".py", ".c", ".h", ".cu", ".cpp", ".sh", ".toml")


def _tracked() -> list[str]:
    try:
        out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout (an sdist): the tracked files are unknown")
    return out.split()


def test_every_cited_file_exists() -> None:
    missing = sorted({f"{path} (cited in {name})" for name in _tracked() if name.endswith(TEXT_SUFFIXES)
                      for path in CITED.findall((ROOT / name).read_text(errors="replace"))
                      if not (ROOT / path).exists()})
    assert not missing, "cited but not in the repository:\n" + "\n".join(missing)


def _imports(path: Path) -> set[str]:
    """The lorafuse modules ``path`` imports (relative imports, at any depth in the file)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                found.add(node.module.split(".")[0])
            else:
                found.update(alias.name for alias in node.names)
    return found & {p.stem for p in PACKAGE.glob("*.py")}


def test_package_imports_have_no_circle() -> None:
    graph = {p.stem: _imports(p) for p in PACKAGE.glob("*.py") if p.stem not in ("__init__", "__main__")}
    state: dict[str, str] = {}

    def visit(module: str, path: tuple[str, ...]) -> None:
        if state.get(module) == "done":
            return
        assert state.get(module) != "open", "import circle: " + " → ".join((*path, module))
        state[module] = "open"
        for dep in sorted(graph.get(module, ())):
            visit(dep, (*path, module))
        state[module] = "done"

    for module in sorted(graph):
        visit(module, ())
    assert graph["layers"] >= {"backend"} and "layers" not in graph["backend"]  # the graph is really read
