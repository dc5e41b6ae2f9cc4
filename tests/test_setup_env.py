"""setup.py's environment settings are checked before anything is built: a bad LORAFUSE_BUILD_JOBS stops the
command with a message naming it (the parallel compile itself is exercised by every build of the extension)."""
from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("jobs", ["0", "-2", "two", "1.5"])
def test_a_bad_build_jobs_value_is_refused(jobs: str) -> None:
    env = dict(os.environ, LORAFUSE_BUILD_JOBS=jobs, LORAFUSE_CUDA="0")
    out = subprocess.run([sys.executable, "setup.py", "--version"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.returncode != 0
    assert f"LORAFUSE_BUILD_JOBS must be a positive integer, got {jobs!r}" in out.stderr


def test_a_good_build_jobs_value_is_taken() -> None:
    env = dict(os.environ, LORAFUSE_BUILD_JOBS="3", LORAFUSE_CUDA="0")
    out = subprocess.run([sys.executable, "setup.py", "--version"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    version = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    assert out.stdout.strip().splitlines()[-1] == version
