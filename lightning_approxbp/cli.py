r"""
Command line
============

``lightning fit --config configs/approxbp.yaml`` (also ``approxbp ...`` and
``python -m lightning_approxbp ...``): a :class:`~lightning.pytorch.cli.LightningCLI` with
``fit``/``validate``/``test``/``predict``, any LightningModule/LightningDataModule in subclass
mode, and this package's callbacks, plugin and recipes importable by short name in YAML
(``class_path: PeakMemoryMonitor``).

- Other first arguments (``lightning login``, ``lightning run ...``) go to the ``lightning``
  command of the ``lightning-sdk`` package when it is installed, so installing this package
  does not take that command away.
- ``--config NAME`` that does not exist as given is looked up in ``./configs/`` and then in the
  ``configs/`` folder of the source checkout this package runs from (editable installs), with
  ``.yaml`` appended when ``NAME`` has no suffix. So ``--config approxbp.yaml``,
  ``--config approxbp`` and ``--config configs/approxbp.yaml`` all work from a checkout.
- Re-runs overwrite the ``config.yaml`` that LightningCLI saves in the log directory.
- A bad value or an unknown key in the YAML or on the command line gets one short message that
  names the option, the value, what is accepted and the closest match, without a traceback;
  ``--debug`` (or ``APPROXBP_DEBUG=1``) shows the traceback.
- ``approxbp estimate --config ...`` prints the simulated step memory of the config, as is and
  converted (:mod:`lightning_approxbp.estimate_cli`); nothing is trained.

Example::

    lightning fit --config configs/approxbp.yaml --trainer.max_epochs=1
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import inspect
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from lightning_approxbp.errors import OptionError

SUBCOMMANDS: tuple[str, ...] = ("fit", "validate", "test", "predict")
SDK_DISTRIBUTION = "lightning-sdk"
# Imported before parsing so that YAML can name their classes without the module path.
SHORT_NAME_MODULES: tuple[str, ...] = (
    "lightning_approxbp.callbacks.approxbp",
    "lightning_approxbp.callbacks.peak_memory",
    "lightning_approxbp.plugins",
)
CONFIG_FLAGS: tuple[str, ...] = ("-c", "--config")
DEBUG_FLAG = "--debug"
DEBUG_ENV_VAR = "APPROXBP_DEBUG"
DEBUG_TIP = f"(run with {DEBUG_FLAG} or {DEBUG_ENV_VAR}=1 for the traceback)"
SOURCE_CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


class ConciseArgumentParser(LightningArgumentParser):
    """LightningCLI's parser, with errors that fit on a screen.

    jsonargparse prints the full usage (about 50 lines for ``fit``) before an error; this parser
    prints one usage line, the error, and for a misspelled option the closest real ones.
    """

    def print_usage(self, file: Any = None) -> None:
        prog = self.prog.replace(" [options]", "")
        (file or sys.stdout).write(f"usage: {prog} [options]\n")

    def error(self, message: str, ex: Exception | None = None) -> Any:
        return super().error(_unknown_class_option(message) or message + self._suggestions(message), ex)

    def _suggestions(self, message: str) -> str:
        unknown = re.findall(r"(--[\w.]+)", message.partition("unrecognized arguments:")[2])
        options = [option for option in self._option_string_actions if option.startswith("--")]
        hints = []
        for option in unknown:
            close = difflib.get_close_matches(option, options, n=3, cutoff=0.75)
            if close:
                hints.append(f"{option}: did you mean {' or '.join(close)}?")
        return "".join(f"\n  {hint}" for hint in hints)


def _unknown_class_option(message: str) -> str | None:
    """For jsonargparse's nested report of an unknown ``init_args`` key, one line that names the
    class, the key and the closest options; ``None`` for any other error."""
    found = re.search(r"Problem with given class_path '([\w.]+)':\s*Option '(\w+)' is not accepted", message)
    if found is None:
        return None
    class_path, option = found.groups()
    key = re.search(r'Parser key "([\w.]+)"', message)
    where = f" (in {key.group(1)})" if key else ""
    module, _, name = class_path.rpartition(".")
    try:
        options = [p for p in inspect.signature(getattr(importlib.import_module(module), name)).parameters
                   if p not in ("self", "args", "kwargs")]
    except (ImportError, AttributeError, ValueError):
        return f"{name} has no option {option!r}{where}."
    close = difflib.get_close_matches(option, options, n=2, cutoff=0.6)
    suggestion = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    return f"{name} has no option {option!r}{where}.{suggestion}\n  Its options: {', '.join(options)}."


def main(args: Sequence[str] | None = None) -> Any:
    """Entry point of the ``lightning`` and ``approxbp`` commands.

    Args:
        args: command-line arguments without the program name; default ``sys.argv[1:]``.

    Returns:
        What ``lightning-sdk``'s command returns when the arguments are handed to it, else ``None``.
    """
    argv = list(sys.argv[1:] if args is None else args)
    estimate = argv[:1] == ["estimate"]  # the simulated step memory of a config (lightning_approxbp.estimate_cli)
    if not estimate and _is_sdk_command(argv):
        entry_point = sdk_entry_point()
        if entry_point is not None:
            return _run_sdk(entry_point, argv)
    debug = DEBUG_FLAG in argv or os.environ.get(DEBUG_ENV_VAR, "0") not in ("", "0")
    argv = [arg for arg in argv if arg != DEBUG_FLAG]
    try:
        if estimate:
            from lightning_approxbp.estimate_cli import estimate_main

            estimate_main(cli(resolve_config_paths(argv[1:]), run=False))
        else:
            cli(resolve_config_paths(argv))
    except Exception as error:
        option_error = None if debug else OptionError.find(error)
        if option_error is None:
            raise
        sys.stderr.write(f"error: {option_error}\n{DEBUG_TIP}\n")
        raise SystemExit(2) from None
    return None


def cli(args: Sequence[str], run: bool = True) -> LightningCLI:
    """Build (and by default run) the LightningCLI for ``args``."""
    for module in (*SHORT_NAME_MODULES, *recipe_modules_named_in(args)):
        importlib.import_module(module)
    saved = sys.argv
    sys.argv = saved[:1]  # the arguments come from `args`; LightningCLI warns when sys.argv has others too
    try:
        return LightningCLI(
            model_class=None,
            datamodule_class=None,
            parser_class=ConciseArgumentParser,
            save_config_kwargs={"overwrite": True},
            args=list(args),
            run=run,
        )
    finally:
        sys.argv = saved


def recipe_modules_named_in(args: Sequence[str]) -> list[str]:
    """The recipe modules whose classes the arguments or their config files name.

    Only those are imported (so that their short names resolve); the others are not loaded.

    Example::

        >>> recipe_modules_named_in(["fit", "--model=TextClassifier"])
        ['lightning_approxbp.recipes.text_classification']
    """
    from lightning_approxbp.recipes import RECIPES

    texts = list(args)
    for arg in args:
        path = Path(arg.partition("=")[2] if arg.startswith(CONFIG_FLAGS) and "=" in arg else arg)
        if path.suffix in (".yaml", ".yml") and path.is_file():
            texts.append(path.read_text())
    words = set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", "\n".join(texts)))
    return sorted({f"lightning_approxbp.recipes.{module}" for name, module in RECIPES.items() if name in words})


def sdk_entry_point() -> importlib.metadata.EntryPoint | None:
    """The ``lightning`` console script of the ``lightning-sdk`` distribution, if installed."""
    try:
        distribution = importlib.metadata.distribution(SDK_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return None
    for entry_point in distribution.entry_points:
        if entry_point.group == "console_scripts" and entry_point.name == "lightning":
            return entry_point
    return None


def resolve_config_paths(argv: Sequence[str]) -> list[str]:
    """Replace every ``--config``/``-c`` value that is not an existing file by the file it names.

    Values that resolve to nothing (or are inline YAML) are left for the parser to report.

    Example::

        >>> resolve_config_paths(["fit", "--config", "no-such-file.yaml"])
        ['fit', '--config', 'no-such-file.yaml']
    """
    resolved = list(argv)
    for i, arg in enumerate(resolved):
        flag, sep, value = arg.partition("=")
        if flag not in CONFIG_FLAGS:
            continue
        if sep:
            resolved[i] = f"{flag}={find_config(value)}"
        elif i + 1 < len(resolved):
            resolved[i + 1] = find_config(resolved[i + 1])
    return resolved


def find_config(name: str) -> str:
    """The path of config ``name`` (see the module docstring), or ``name`` unchanged."""
    if Path(name).is_file() or not _looks_like_path(name):
        return name
    names = [name] if Path(name).suffix else [name, f"{name}.yaml"]
    for folder in (Path.cwd(), Path.cwd() / "configs", SOURCE_CONFIG_DIR):
        for candidate in names:
            path = folder / candidate
            if path.is_file():
                return str(path)
            path = folder / Path(candidate).name
            if path.is_file():
                return str(path)
    return name


def _looks_like_path(value: str) -> bool:
    return bool(value) and not any(c in value for c in "{}:\n ")


def _is_sdk_command(argv: Sequence[str]) -> bool:
    return bool(argv) and argv[0] not in SUBCOMMANDS and not argv[0].startswith("-")


def _run_sdk(entry_point: importlib.metadata.EntryPoint, argv: list[str]) -> Any:
    command = entry_point.load()
    saved = sys.argv
    sys.argv = ["lightning", *argv]  # click-based commands read sys.argv
    try:
        return command()
    finally:
        sys.argv = saved
