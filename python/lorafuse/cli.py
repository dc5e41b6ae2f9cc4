"""The ``lorafuse`` command line (console script ``lorafuse = lorafuse.cli:main``).

Subcommands are registered in :data:`COMMANDS`: each maps a name to a function that adds
its arguments to an ``argparse`` sub-parser and returns the handler to run, so further
commands (``demo``, ``bench``) plug in without touching the others.

``lorafuse inspect DIR`` prints an adapter directory's config, each tensor (name, shape,
dtype), the parameter count and whether the directory validates; the exit status is 0
when it does and 1 (with the reason) when it does not.  Only the files are checked: no
model is loaded, and torch is not imported.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Callable, Optional, Sequence

from .io_validate import (
    CONFIG_NAME,
    MAX_CONFIG_BYTES,
    WEIGHTS_NAME,
    AdapterFileError,
    AdapterFiles,
    TensorInfo,
    parse_header,
    read_adapter_dir,
    read_regular_file,
)

Handler = Callable[[argparse.Namespace], int]

# the pip extra that installs what each command imports beyond NumPy
EXTRAS = {"demo": "demo", "bench": "demo", "inspect": "torch"}


def _print_config(config: dict) -> None:
    print(f"== {CONFIG_NAME}")
    print(json.dumps(config, indent=2, sort_keys=True))


def _print_tensor_table(tensors: dict[str, TensorInfo]) -> None:
    for name in sorted(tensors):
        print(f"{name}  {list(tensors[name].shape)}  {tensors[name].dtype}")


def _print_tensors(files: AdapterFiles) -> None:
    print(f"== {WEIGHTS_NAME}")
    _print_tensor_table(files.tensors)
    print(f"parameters: {files.num_parameters:,d} in {len(files.tensors)} tensors")


def _sub_adapters(directory: str) -> list[str]:
    """Names of the non-default adapters saved next to this one (``DIR/<name>/``); hidden folders (a
    killed save's ``.lorafuse-save-*`` staging folder) are not adapters."""
    return sorted(
        entry.name for entry in os.scandir(directory)
        if not entry.name.startswith(".") and entry.is_dir() and os.path.isfile(os.path.join(entry.path, CONFIG_NAME))
    )


def _print_partial(directory: str) -> None:
    """What can still be shown of an invalid directory: the raw config and the header."""
    for name, show in ((CONFIG_NAME, _show_raw_config), (WEIGHTS_NAME, _show_raw_header)):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            try:
                show(path)
            except (OSError, ValueError, RecursionError):  # the reason is printed by the caller
                print(f"== {name}: unreadable")


def _show_raw_config(path: str) -> None:
    _print_config(json.loads(read_regular_file(path, MAX_CONFIG_BYTES)))


def _show_raw_header(path: str) -> None:
    tensors = parse_header(read_regular_file(path))
    print(f"== {WEIGHTS_NAME} (header only)")
    _print_tensor_table(tensors)


def run_inspect(args: argparse.Namespace) -> int:
    """Handler of ``lorafuse inspect DIR``."""
    try:
        files = read_adapter_dir(args.directory)
    except AdapterFileError as exc:
        if os.path.isdir(args.directory):
            _print_partial(args.directory)
        print(f"INVALID: {exc}")
        return 1
    _print_config(files.config)
    _print_tensors(files)
    others = _sub_adapters(args.directory)
    if others:
        print(f"other adapters in subdirectories: {', '.join(others)}")
    print("valid: yes (files only; run load_adapter to check against a model)")
    return 0


def _add_inspect(parser: argparse.ArgumentParser) -> Handler:
    parser.add_argument("directory", help="adapter directory (adapter_config.json + adapter_model.safetensors)")
    return run_inspect


def _add_demo(parser: argparse.ArgumentParser) -> Handler:
    from .demo import add_arguments  # torch/transformers load only when the demo runs

    return add_arguments(parser)


def _add_bench(parser: argparse.ArgumentParser) -> Handler:
    from .bench_cli import add_arguments

    return add_arguments(parser)


COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], Handler]]] = {
    "demo": ("fine-tune a pretrained model with LoRA, side by side with PEFT", _add_demo),
    "bench": ("layer benchmark: lorafuse vs torch F.linear vs torch + PEFT", _add_bench),
    "inspect": ("show and validate a PEFT/lorafuse adapter directory", _add_inspect),
}


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one sub-parser per entry of :data:`COMMANDS`."""
    from . import __version__

    parser = argparse.ArgumentParser(prog="lorafuse", description="lorafuse: fused LoRA kernels and tools")
    parser.add_argument("--version", action="version", version=f"lorafuse {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, add_arguments) in COMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(handler=add_arguments(sub))
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``lorafuse`` console script; returns the exit status: 0 done, 1 failed, 2 a
    usage mistake or a missing package (one line on stderr, no traceback), 130 interrupted (Ctrl-C)."""
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        # on a terminal the cursor may sit after an unfinished progress bar (and the echoed ^C): a line of its own
        lead = "\n" if sys.stderr.isatty() else ""
        print(f"{lead}lorafuse {args.command}: interrupted", file=sys.stderr)
        return 130
    except ModuleNotFoundError as exc:
        if not exc.name or exc.name.split(".")[0] == "lorafuse":
            raise  # a broken install of lorafuse itself: the traceback is the report
        print(f"error: lorafuse {args.command} needs the Python package {exc.name.split('.')[0]!r}, which is not "
              f"installed: pip install 'lorafuse[{EXTRAS[args.command]}]'", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
