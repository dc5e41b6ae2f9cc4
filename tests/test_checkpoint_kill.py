"""A training loop that checkpoints every K steps, SIGKILLed at random points, then resumed.

The child process (``TRAINER`` below) trains a small LoRA model (dropout on, AdamW) and every
``K`` steps writes

* ``ckpt/adapter/`` — lorafuse's ``save_pretrained`` over the same directory each time (PEFT's
  files, moved into place atomically one by one: the adapter a user would pick up at any moment),
* ``ckpt/step-<s>/`` — adapter (``save_pretrained``) + ``trainer_state.safetensors``
  (AdamW moments, torch RNG state, step) written with ``lorafuse.atomic.atomic_write``,
* ``ckpt/latest`` — the step number, written last with ``atomic_write``: the commit marker.

It is killed with SIGKILL at random moments (several times per run) and restarted with
``--resume``, which loads ``step-<latest>`` with ``lorafuse.PeftModel.from_pretrained`` and restores
the optimizer and RNG state. Checked after every kill: ``ckpt/adapter`` and the checkpoint ``latest``
names always validate and load into the model (never a corrupt or partial adapter; the stray temp
files and hidden ``.lorafuse-save-*`` staging folders a kill leaves are ignored); and at the end, the
resumed run's per-step losses and final adapter + optimizer state are bit-identical to an
uninterrupted run's.
"""
from __future__ import annotations

import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")

STEPS, K = 30, 3

# the base model, shared by the trainer and by the checks here
BASE = textwrap.dedent('''
    import torch
    from torch import nn

    def base():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(24, 32), nn.Tanh(), nn.Linear(32, 24), nn.Tanh(), nn.Linear(24, 4))
''')

TRAINER = BASE + textwrap.dedent(r'''
    import os, sys
    import lorafuse
    from lorafuse import LoraConfig, PeftModel, get_peft_model
    from lorafuse.atomic import atomic_write
    from safetensors.torch import load_file, save

    torch.set_num_threads(1)
    lorafuse.set_num_threads(1)
    root, steps, every = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    ckpt = os.path.join(root, "ckpt")
    os.makedirs(ckpt, exist_ok=True)

    latest = os.path.join(ckpt, "latest")
    start = 0
    if os.path.exists(latest):
        start = int(open(latest).read())
        d = os.path.join(ckpt, f"step-{start}")
        model = PeftModel.from_pretrained(base(), d, is_trainable=True)
        state = load_file(os.path.join(d, "trainer_state.safetensors"))
    else:
        model = get_peft_model(base(), LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2", "4"],
                                                  lora_dropout=0.2, init_lora_weights="gaussian"))
        torch.manual_seed(1)
        state = None
    model.train()
    params = sorted((n, p) for n, p in model.named_parameters() if p.requires_grad)
    opt = torch.optim.AdamW([p for _, p in params], lr=2e-2)
    if state is not None:
        sd = opt.state_dict()
        sd["state"] = {i: {"step": state[f"{i}.step"], "exp_avg": state[f"{i}.exp_avg"],
                           "exp_avg_sq": state[f"{i}.exp_avg_sq"]} for i in range(len(params))}
        opt.load_state_dict(sd)
        torch.set_rng_state(state["rng"])
    print("ready", start, flush=True)
    import time
    t_ready = time.perf_counter()
    log = open(os.path.join(root, "losses.txt"), "a")
    for step in range(start + 1, steps + 1):
        g = torch.Generator().manual_seed(step)
        x = torch.randn(16, 24, generator=g)
        t = torch.randn(16, 4, generator=g)
        opt.zero_grad()
        loss = (model(x) - t).pow(2).mean()
        loss.backward()
        opt.step()
        log.write(f"{step} {loss.item().hex()}\n")
        log.flush()
        if step % every == 0 or step == steps:
            model.save_pretrained(os.path.join(ckpt, "adapter"))
            d = os.path.join(ckpt, f"step-{step}")
            model.save_pretrained(d)
            st = {"rng": torch.get_rng_state()}
            for i, (n, p) in enumerate(params):
                s = opt.state[p]
                st[f"{i}.step"], st[f"{i}.exp_avg"], st[f"{i}.exp_avg_sq"] = s["step"], s["exp_avg"], s["exp_avg_sq"]
            atomic_write(os.path.join(d, "trainer_state.safetensors"), save(st))
            atomic_write(latest, str(step).encode())
    print("done", time.perf_counter() - t_ready, flush=True)
''')


def run_trainer(root: Path, kill_after: float | None = None) -> tuple:
    """Run (or resume) the trainer; SIGKILL it ``kill_after`` s after it is ready.
    Returns ("killed", None) or ("done", seconds of training after start-up)."""
    proc = subprocess.Popen([sys.executable, "-c", TRAINER, str(root), str(STEPS), str(K)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("ready"), line + proc.stderr.read()
        if kill_after is not None:
            time.sleep(kill_after)
            proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=120)
        out, err = proc.stdout.read(), proc.stderr.read()  # not communicate(): readline() buffered ahead
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if proc.returncode == -signal.SIGKILL:
        return "killed", None
    assert proc.returncode == 0, err
    assert "done" in out, out
    return "done", float(out.split("done")[1].split()[0])


def losses(root: Path) -> dict:
    """step -> loss (float.hex) from the log; the last entry per step wins, a torn last line is ignored."""
    result = {}
    for line in (root / "losses.txt").read_text().splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0].isdigit():
            try:
                result[int(parts[0])] = float.fromhex(parts[1])
            except ValueError:
                pass
    return result


def final_state(root: Path) -> dict:
    from safetensors.torch import load_file

    d = root / "ckpt" / f"step-{STEPS}"
    out = {f"adapter/{k}": v for k, v in load_file(str(d / "adapter_model.safetensors")).items()}
    out.update({f"trainer/{k}": v for k, v in load_file(str(d / "trainer_state.safetensors")).items()})
    return out


def base_model() -> torch.nn.Module:
    """The trainer's base model (``BASE``)."""
    namespace: dict = {}
    exec(BASE, namespace)
    return namespace["base"]()


def assert_loads(directory: Path) -> None:
    """``directory`` validates and loads with lorafuse's loader, holding exactly its file's tensors."""
    from safetensors.torch import load_file

    import lorafuse
    from lorafuse.io_validate import read_adapter_dir

    assert read_adapter_dir(str(directory)).num_parameters > 0
    model = lorafuse.PeftModel.from_pretrained(base_model(), str(directory))
    state = model.state_dict()
    for key, value in load_file(str(directory / "adapter_model.safetensors")).items():
        module = key.removeprefix("base_model.model.").rsplit(".", 1)[0]
        assert torch.equal(state[f"base_model.model.{module}.default.weight"], value), key


def check_loadable(root: Path) -> None:
    """Whatever the kill left behind: the user-facing adapter and the committed checkpoint load."""
    from safetensors.torch import load_file

    ckpt = root / "ckpt"
    if (ckpt / "adapter" / "adapter_model.safetensors").exists():
        assert_loads(ckpt / "adapter")
    if (ckpt / "latest").exists():
        step = int((ckpt / "latest").read_text())
        d = ckpt / f"step-{step}"
        assert_loads(d)
        load_file(str(d / "trainer_state.safetensors"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("uninterrupted")
    ended, seconds = run_trainer(root)
    assert ended == "done"
    (root / "seconds").write_text(str(seconds))
    return root


@pytest.mark.slow  # repeated SIGKILLs and resumes (~30 s): CI's second stage, `pytest -m slow`
def test_killed_and_resumed_training_is_identical(reference: Path, tmp_path: Path) -> None:
    rng = random.Random(2024)
    ref_losses, ref_state = losses(reference), final_state(reference)
    assert sorted(ref_losses) == list(range(1, STEPS + 1))
    duration = float((reference / "seconds").read_text())
    kills = runs = 0
    while True:
        runs += 1
        assert runs < 40, "training never finished"
        # a random kill point inside what is left of the run (scaled by the uninterrupted run's time)
        latest = tmp_path / "ckpt" / "latest"
        left = duration * (STEPS - (int(latest.read_text()) if latest.exists() else 0)) / STEPS
        delay = rng.uniform(0.0, 0.8 * left) if kills < 4 else None
        ended, _ = run_trainer(tmp_path, delay)
        check_loadable(tmp_path)
        if ended == "done":
            break
        kills += 1
    got_losses, got_state = losses(tmp_path), final_state(tmp_path)
    print(f"{kills} SIGKILLs over {runs} runs (uninterrupted training: {duration:.2f} s); "
          "every checkpoint left behind loaded")
    assert kills >= 3, "the kills did not land inside training (machine too fast?)"
    assert got_losses == ref_losses
    assert got_state.keys() == ref_state.keys()
    for key in ref_state:
        assert torch.equal(got_state[key], ref_state[key]), key
    stray = sorted(str(p.relative_to(tmp_path / "ckpt")) for p in (tmp_path / "ckpt").glob("*/.*"))
    print(f"stray temp files and staging folders left by kills (ignored by the loaders): {stray}")
