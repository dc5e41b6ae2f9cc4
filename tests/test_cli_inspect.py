"""``lorafuse inspect DIR``: config, tensors, parameter count, validity and exit status — on hand-made
directories and on directories written by a lorafuse model and by stock PEFT."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from lorafuse import cli
from lorafuse.io_validate import CONFIG_NAME, WEIGHTS_NAME

safetensors_numpy = pytest.importorskip("safetensors.numpy")
np = pytest.importorskip("numpy")

A_KEY = "base_model.model.layer.q.lora_A.weight"
B_KEY = "base_model.model.layer.q.lora_B.weight"


@pytest.fixture
def adapter(tmp_path: Path) -> Path:
    """A small valid adapter directory written without torch: r=2, in 6, out 5."""
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q"], "inference_mode": True}
    (tmp_path / CONFIG_NAME).write_text(json.dumps(config))
    tensors = {A_KEY: np.ones((2, 6), np.float32), B_KEY: np.zeros((5, 2), np.float32)}
    safetensors_numpy.save_file(tensors, str(tmp_path / WEIGHTS_NAME), metadata={"format": "pt"})
    return tmp_path


def test_valid_directory(adapter: Path, capsys: pytest.CaptureFixture) -> None:
    (adapter / "second").mkdir()
    (adapter / "second" / CONFIG_NAME).write_text("{}")
    assert cli.main(["inspect", str(adapter)]) == 0
    out = capsys.readouterr().out
    assert '"target_modules": [\n    "q"\n  ]' in out
    assert f"{A_KEY}  [2, 6]  F32" in out and f"{B_KEY}  [5, 2]  F32" in out
    assert "parameters: 22 in 2 tensors" in out
    assert "other adapters in subdirectories: second" in out
    assert "valid: yes" in out


def test_invalid_directory_shows_what_it_can(adapter: Path, capsys: pytest.CaptureFixture) -> None:
    config = json.loads((adapter / CONFIG_NAME).read_text())
    (adapter / CONFIG_NAME).write_text(json.dumps(dict(config, r=4)))
    assert cli.main(["inspect", str(adapter)]) == 1
    out = capsys.readouterr().out
    assert f"{A_KEY}  [2, 6]  F32" in out  # header still listed
    assert "INVALID:" in out and "the config allows r" in out


@pytest.mark.parametrize("breakage", ["missing", "garbage weights", "garbage config", "deep config", "fifo config"])
def test_broken_files_exit_nonzero(adapter: Path, breakage: str, capsys: pytest.CaptureFixture) -> None:
    target = adapter
    if breakage == "missing":
        target = adapter / "nowhere"
    elif breakage == "deep config":
        (adapter / CONFIG_NAME).write_text("[" * 100_000)
    elif breakage == "fifo config":
        (adapter / CONFIG_NAME).unlink()
        os.mkfifo(adapter / CONFIG_NAME)
    else:
        name = WEIGHTS_NAME if breakage == "garbage weights" else CONFIG_NAME
        (adapter / name).write_bytes(b"\x07garbage")
    assert cli.main(["inspect", str(target)]) == 1
    assert "INVALID:" in capsys.readouterr().out


def saved_adapters(tmp_path: Path, writer: str) -> Path:
    """A two-adapter directory ("second" in its subfolder) written by a lorafuse model, by stock PEFT,
    or by stock PEFT with DoRA (which lorafuse loads through PEFT)."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    import lorafuse

    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 4))
    make = lorafuse.get_peft_model if writer == "lorafuse" else peft.get_peft_model
    model = make(base, peft.LoraConfig(r=2, target_modules=["0", "2"], use_dora=writer == "peft-dora"))
    model.add_adapter("second", peft.LoraConfig(r=3, target_modules=["0"]))
    model.save_pretrained(str(tmp_path))
    return tmp_path


@pytest.mark.parametrize("writer", ["lorafuse", "peft", "peft-dora"])
def test_directories_written_by_lorafuse_and_peft(tmp_path: Path, writer: str, capsys: pytest.CaptureFixture) -> None:
    directory = saved_adapters(tmp_path, writer)
    for sub, others in (("", "other adapters in subdirectories: second"), ("second", None)):
        assert cli.main(["inspect", str(directory / sub)]) == 0
        out = capsys.readouterr().out
        tensors = safetensors_numpy.load_file(str(directory / sub / WEIGHTS_NAME))
        assert tensors and all(f"{name}  {list(t.shape)}  F32" in out for name, t in tensors.items())
        assert f"parameters: {sum(t.size for t in tensors.values()):,d} in {len(tensors)} tensors" in out
        config = json.loads((directory / sub / CONFIG_NAME).read_text())
        assert f'"r": {config["r"]},' in out and f'"use_dora": {json.dumps(config["use_dora"])},' in out
        assert (others in out) if others else "other adapters" not in out
        assert "valid: yes" in out


def test_stray_staging_folder_is_not_an_adapter(adapter: Path, capsys: pytest.CaptureFixture) -> None:
    """A save killed before it moved its files leaves a hidden staging folder holding a whole adapter."""
    staging = adapter / ".lorafuse-save-x1y2"
    staging.mkdir()
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        (staging / name).write_bytes((adapter / name).read_bytes())
    assert cli.main(["inspect", str(adapter)]) == 0
    assert ".lorafuse-save-" not in capsys.readouterr().out


def test_console_entry_point_via_python_m(adapter: Path) -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    done = subprocess.run([sys.executable, "-m", "lorafuse", "inspect", str(adapter)], capture_output=True,
                          text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "valid: yes" in done.stdout


def test_subcommand_is_required(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main([])
    assert info.value.code == 2


def test_commands_registry_builds_subparsers() -> None:
    parser: Any = cli.build_parser()
    args = parser.parse_args(["inspect", "somewhere"])
    assert args.handler is cli.run_inspect and args.directory == "somewhere"
