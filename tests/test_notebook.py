"""examples/quickstart.ipynb runs top to bottom (nbclient, kernel python3) and mirrors quickstart.py."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")
nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")
NOTEBOOK = os.path.join(EXAMPLES, "quickstart.ipynb")


def _ensure_python3_kernel() -> None:
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        KernelSpecManager().get_kernel_spec("python3")
    except NoSuchKernel:  # ipykernel is installed but no spec is registered: register it for this user
        subprocess.run([sys.executable, "-m", "ipykernel", "install", "--user", "--name", "python3"], check=True)


def test_notebook_matches_script():
    sys.path.insert(0, EXAMPLES)
    try:
        from make_notebook import cells_from_script
    finally:
        sys.path.remove(EXAMPLES)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    expected = cells_from_script(os.path.join(EXAMPLES, "quickstart.py"))
    assert [(c.cell_type, c.source) for c in nb.cells] == expected, \
        "quickstart.ipynb is out of date: run python examples/make_notebook.py --execute"


def test_notebook_executes(tmp_path):
    _ensure_python3_kernel()
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError with the traceback if any cell fails
    text = "\n".join(out.get("text", "") for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs)
    assert "trainable params: 16,384" in text
    assert "PeftModelForCausalLM is a peft.PeftModel: True" in text  # lorafuse's model is PEFT's
    assert "path of every LoRA layer's last forward: {'c'}" in text  # and it trained on the fused kernels
    assert "PEFT reloads the lorafuse adapter: same logits" in text
    assert "merged model gives the same logits" in text
