"""The source distribution carries every file the build needs (a pip install from PyPI builds
from it): each tracked file under csrc/ and kernels/, and the setup scripts."""
from __future__ import annotations

import pathlib
import shutil
import subprocess
import sys
import tarfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _tracked(*paths: str) -> set[str]:
    out = subprocess.run(["git", "ls-files", "--", *paths], cwd=ROOT, capture_output=True, text=True, check=True)
    return set(out.stdout.split())


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(), reason="needs a git checkout")
def test_the_sdist_holds_every_build_input(tmp_path):
    src = tmp_path / "src"  # a copy of the tracked files: no egg-info left over from a local build
    for name in _tracked("."):
        if (ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path)], cwd=src, check=True,
                   capture_output=True, env={"LORAFUSE_CUDA": "0", "PATH": "/usr/bin:/bin"})
    (archive,) = tmp_path.glob("lorafuse-*.tar.gz")
    with tarfile.open(archive) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    needed = _tracked("csrc", "kernels") | {"setup.py", "setup_cuda.py", "pyproject.toml", "README.md"}
    assert not needed - names, f"missing from the sdist: {sorted(needed - names)}"
