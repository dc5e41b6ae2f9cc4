"""atheris harness for adapter loading (`lorafuse.io_validate` in front of PEFT's loader).

Starts from a valid adapter directory written by a lorafuse model (a ``peft.PeftModel`` converted by
``lorafuse.get_peft_model``) for a tiny two-block model, then per
input writes a mutated ``adapter_model.safetensors`` and/or ``adapter_config.json``:

* byte-level mutations of the safetensors file (overwrite, insert, delete, truncate, a forged
  8-byte header length);
* structured header mutations (dtype, shape incl. negative/huge, data_offsets, duplicate keys,
  NUL in names, ``__metadata__`` as a tensor, non-string metadata, trailing bytes);
* config mutations: any PEFT key set to hostile values — ``r`` as "8"/-1/0/1e9, NaN alpha,
  unknown ``peft_type``, deep nesting, and ``target_modules`` regexes that backtrack
  catastrophically (``(a+)+$``, ``(.*a){20}``, ...) or come straight from the fuzz bytes;
* both files raw from the fuzz bytes.

Then ``model.load_adapter(dir, "fz")`` on the live lorafuse model (validation, then PEFT, rolled back
if PEFT fails). The contract checked:

* every rejection is an ``AdapterFileError`` (a ValueError naming the problem); anything else
  is a finding;
* a rejected adapter leaves the model exactly as it was (parameter names and values) — except
  where the config asks for an initialisation that rewrites the base weights as it loads (PiSSA,
  OLoRA, CorDA: PEFT's semantics), which the rollback does not undo; the model is rebuilt then;
* an accepted weights file is also accepted by ``safetensors.torch.load`` (differential);
* no input takes longer than ``LORAFUSE_FUZZ_SLOW_S`` seconds (default 2): a catastrophic regex
  would.

Run:  python fuzz/fuzz_loader.py [libFuzzer flags, e.g. -max_total_time=60 corpus_dir]
"""
from __future__ import annotations

import json
import os
import shutil
import struct
import sys
import tempfile
import time

if os.environ.get("LORAFUSE_FUZZ_NO_LIBFUZZER") == "1":
    import atheris_no_libfuzzer as atheris  # type: ignore
else:
    import atheris

import torch
from torch import nn

with atheris.instrument_imports(include=["lorafuse.io_validate", "lorafuse.peft_fused"]):
    from lorafuse import LoraConfig, get_peft_model, io_validate

from safetensors.torch import load as st_load

SLOW_S = float(os.environ.get("LORAFUSE_FUZZ_SLOW_S", "2"))
WEIGHTS, CONFIG = io_validate.WEIGHTS_NAME, io_validate.CONFIG_NAME
torch.set_num_threads(1)

CATASTROPHIC = ["(a+)+$", "(.*a){20}", "(x+x+)+y", "^(([a-z])+.)+[A-Z]([a-z])+$", "(a|aa)+$", "(a|a?)+b",
                "(.*)*q_proj", "((q|_|p|r|o|j|\\.|[0-9]|l|a|y|e|s)+)+z", "(?:.*.*.*.*.*.*.*.*)*x",
                "(\\w+\\s?)+$", "(.*){1,32000}[bc]", "(?=(a+))a*b\\1", "(a*)*\\1b", "[\\s\\S]*" * 40 + "z",
                ".*layers\\.\\d+\\.(q_proj|v_proj)"]
HOSTILE_VALUES = [None, True, False, 0, -1, 1, 8, 2**31, 2**63, 10**9, 1e9, float("nan"), float("inf"), -0.0,
                  "8", "", "LORA", "PROMPT_TUNING", "all-linear", "gaussian", "pissa", [], {}, [1, 2],
                  ["q_proj", 3], {"a": 1}, "\x00", "a" * 5000]
CONFIG_KEYS = ["r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules", "peft_type", "bias",
               "fan_in_fan_out", "use_rslora", "modules_to_save", "init_lora_weights", "layers_to_transform",
               "layers_pattern", "rank_pattern", "alpha_pattern", "task_type", "inference_mode",
               "use_dora", "lora_bias", "base_model_name_or_path", "revision", "auto_mapping", "unknown_key"]
DTYPES = ["F32", "F16", "BF16", "F64", "I8", "U8", "BOOL", "F128", "F8_E4M3", "F4", "", "f32", 7]


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj = nn.Linear(6, 6)
        self.v_proj = nn.Linear(6, 4)
        self.mlp = nn.Linear(4, 6)


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([Block(), Block()])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.layers:
            x = b.mlp(b.v_proj(b.q_proj(x)))
        return x


def _model() -> nn.Module:
    torch.manual_seed(0)
    return get_peft_model(Tiny(), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))


# initialisations with which PEFT rewrites the base weights while the adapter loads
REWRITES_BASE = ("pissa", "olora", "corda")


def rewrites_base(config: bytes) -> bool:
    """Whether a config (as bytes, maybe not JSON) asks for an initialisation in REWRITES_BASE."""
    try:
        init = json.loads(config).get("init_lora_weights")
    except Exception:
        return False
    return isinstance(init, str) and init.lower().startswith(REWRITES_BASE)


def _setup() -> tuple:
    model = _model()
    src = tempfile.mkdtemp(prefix="lf_fuzz_seed_")
    model.save_pretrained(src)
    with open(os.path.join(src, WEIGHTS), "rb") as f:
        weights = f.read()
    with open(os.path.join(src, CONFIG), "rb") as f:
        config = f.read()
    shutil.rmtree(src)
    work = tempfile.mkdtemp(prefix="lf_fuzz_", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    return model, weights, config, work


MODEL, GOOD_WEIGHTS, GOOD_CONFIG, WORK = _setup()


def fingerprint(model: nn.Module) -> tuple:
    return tuple((n, float(p.detach().double().sum()), p.requires_grad) for n, p in model.named_parameters()) + \
        (tuple(model.peft_config),)


FP0 = fingerprint(MODEL)


def split(weights: bytes) -> tuple:
    (n,) = struct.unpack("<Q", weights[:8])
    return json.loads(weights[8:8 + n]), weights[8 + n:]


def join(header: object, data: bytes, raw_header: bytes = None) -> bytes:
    hb = raw_header if raw_header is not None else json.dumps(header).encode()
    return struct.pack("<Q", len(hb)) + hb + data


def mutate_bytes(fdp: atheris.FuzzedDataProvider, blob: bytes) -> bytes:
    b = bytearray(blob)
    for _ in range(fdp.ConsumeIntInRange(1, 4)):
        op = fdp.ConsumeIntInRange(0, 5)
        pos = fdp.ConsumeIntInRange(0, max(len(b) - 1, 0))
        if op == 0 and b:
            b[pos] = fdp.ConsumeIntInRange(0, 255)
        elif op == 1:
            b[pos:pos] = fdp.ConsumeBytes(fdp.ConsumeIntInRange(1, 16))
        elif op == 2:
            del b[pos:pos + fdp.ConsumeIntInRange(1, 16)]
        elif op == 3:
            del b[pos:]
        elif op == 4 and len(b) >= 8:
            b[:8] = struct.pack("<Q", [0, 1, 7, len(b), len(b) - 8, 2**64 - 1, 2**63, 100_000_001,
                                       fdp.ConsumeIntInRange(0, 2**64 - 1)][fdp.ConsumeIntInRange(0, 8)])
        else:
            b += fdp.ConsumeBytes(fdp.ConsumeIntInRange(1, 32))
    return bytes(b)


def mutate_header(fdp: atheris.FuzzedDataProvider, weights: bytes) -> bytes:
    header, data = split(weights)
    names = sorted(k for k in header if k != "__metadata__")
    name = names[fdp.ConsumeIntInRange(0, len(names) - 1)]
    entry = header[name]
    op = fdp.ConsumeIntInRange(0, 11)
    raw = None
    if op == 0:
        entry["dtype"] = DTYPES[fdp.ConsumeIntInRange(0, len(DTYPES) - 1)]
    elif op == 1:
        entry["shape"] = [fdp.PickValueInList([0, 1, 2, 3, 6, -1, 2**31, 2**63, 2**64 - 2, 2**70, 1.5, "2"])
                          for _ in range(fdp.ConsumeIntInRange(0, 4))]
    elif op == 2:
        entry["data_offsets"] = [fdp.ConsumeIntInRange(-5, len(data) + 64) for _ in range(fdp.ConsumeIntInRange(0, 3))]
    elif op == 3:  # duplicate key (last-wins smuggling), written as raw text
        text = json.dumps(header)
        dup = json.dumps({name: entry})[1:-1]
        raw = (text[:-1] + ", " + dup + "}").encode()
    elif op == 4:
        header[name + "\x00hidden"] = header.pop(name)
    elif op == 5:
        header["__metadata__"] = fdp.PickValueInList([{"format": 1}, {"format": None}, [], "pt", {"a": {"b": 1}}])
    elif op == 6:
        header["__metadata__"] = dict(entry)  # a tensor named __metadata__
    elif op == 7:
        data = data + b"extra_bogus_data_for_polyglot_file"
    elif op == 8:
        header[fdp.ConsumeUnicodeNoSurrogates(24)] = dict(entry)
    elif op == 9:  # rename into another layer / unknown module / another adapter kind
        header[fdp.PickValueInList([
            name.replace("q_proj", "k_proj"), name.replace("layers.0", "layers.7"),
            name.replace("lora_A", "lora_embedding_A"), name.replace(".weight", ""),
            name.replace("lora_A.weight", "lora_magnitude_vector"), "base_model.model.layers.0.q_proj.lora_B.bias",
            "model." + name])] = header.pop(name)
    elif op == 10:  # NaN / inf values in the data
        begin, _ = entry["data_offsets"]
        data = data[:begin] + fdp.PickValueInList([b"\x00\x00\xc0\x7f", b"\x00\x00\x80\x7f"]) + data[begin + 4:]
    else:
        del header[name]
    return join(header, data, raw)


def mutate_config(fdp: atheris.FuzzedDataProvider, config: bytes) -> bytes:
    cfg = json.loads(config)
    for _ in range(fdp.ConsumeIntInRange(1, 3)):
        key = CONFIG_KEYS[fdp.ConsumeIntInRange(0, len(CONFIG_KEYS) - 1)]
        kind = fdp.ConsumeIntInRange(0, 5)
        if kind == 0 or key in ("target_modules", "exclude_modules", "layers_pattern") and kind < 3:
            value = CATASTROPHIC[fdp.ConsumeIntInRange(0, len(CATASTROPHIC) - 1)]
        elif kind == 1:
            value = fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 64))
        elif kind == 2 and key in ("rank_pattern", "alpha_pattern"):
            value = {CATASTROPHIC[fdp.ConsumeIntInRange(0, len(CATASTROPHIC) - 1)]: fdp.PickValueInList([1, 2, 4, -3])}
        elif kind == 3:  # deep nesting
            value = fdp.ConsumeIntInRange(1, 3)
            for _ in range(fdp.ConsumeIntInRange(1, 5000)):
                value = [value]
        else:
            value = HOSTILE_VALUES[fdp.ConsumeIntInRange(0, len(HOSTILE_VALUES) - 1)]
        if fdp.ConsumeIntInRange(0, 7) == 0:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    try:
        return json.dumps(cfg).encode()
    except (ValueError, RecursionError):  # our own json.dumps of a very deep value
        return config


def write(weights: bytes, config: bytes) -> None:
    for name, blob in ((WEIGHTS, weights), (CONFIG, config)):
        path = os.path.join(WORK, name)
        if blob is None:
            if os.path.exists(path):
                os.unlink(path)
        else:
            with open(path, "wb") as f:
                f.write(blob)


COUNTS = {"accepted": 0, "rejected": 0}


def TestOneInput(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    mode = fdp.ConsumeIntInRange(0, 5)
    weights, config = GOOD_WEIGHTS, GOOD_CONFIG
    if mode == 0:
        weights = mutate_bytes(fdp, weights)
    elif mode == 1:
        weights = mutate_header(fdp, weights)
    elif mode == 2:
        config = mutate_config(fdp, config)
    elif mode == 3:
        weights, config = mutate_header(fdp, weights), mutate_config(fdp, config)
    elif mode == 4:
        config = mutate_bytes(fdp, config)
    else:
        cut = fdp.ConsumeIntInRange(0, 4096)
        rest = fdp.ConsumeBytes(fdp.remaining_bytes())
        weights, config = rest[cut:], rest[:cut]
    write(weights, config)
    t0 = time.perf_counter()
    accepted = False
    try:
        MODEL.load_adapter(WORK, "fz", is_trainable=False)
        accepted = True
        COUNTS["accepted"] += 1
    except io_validate.AdapterFileError:
        COUNTS["rejected"] += 1
    finally:
        took = time.perf_counter() - t0
    if took > SLOW_S:
        raise AssertionError(f"loading took {took:.2f} s (> {SLOW_S} s): config {config[:300]!r}")
    if accepted:
        st_load(weights)  # differential: safetensors itself must accept what we accepted
    if accepted or rewrites_base(config):
        _rebuild()
    elif fingerprint(MODEL) != FP0:
        raise AssertionError("the model changed after a rejected adapter")


def _rebuild() -> None:
    """A fresh model after an accepted input (PEFT's delete_adapter keeps the LoRA layers it wrapped
    around new targets) or one whose initialisation legitimately rewrote the base weights."""
    global MODEL
    MODEL = _model()


fuzz_targets = (mutate_bytes, mutate_header, mutate_config)
mutate_bytes, mutate_header, mutate_config = (atheris.instrument_func(f) for f in fuzz_targets)


def replay(paths: list) -> None:
    """Run a corpus (files or directories) once and count accepted / rejected / known-finding inputs."""
    import warnings

    warnings.simplefilter("ignore")
    files = []
    for p in paths:
        files += [os.path.join(p, f) for f in sorted(os.listdir(p))] if os.path.isdir(p) else [p]
    for f in files:
        with open(f, "rb") as fh:
            TestOneInput(fh.read())
    print(f"replayed {len(files)} inputs: {COUNTS['rejected']} rejected with AdapterFileError, "
          f"{COUNTS['accepted']} accepted (differentially checked against safetensors)")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--replay":
        replay(sys.argv[2:])
        return
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
