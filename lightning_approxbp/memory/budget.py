"""Memory budgets as users write them: bytes, ``"20GiB"``, or a fraction of the device's memory."""

from __future__ import annotations

import re
from pathlib import Path

import torch

_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_PATTERN = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*$")
_MEMINFO = Path("/proc/meminfo")


def device_memory(device: torch.device) -> int:
    """Total memory of ``device`` in bytes: the GPU's, or on CPU the host's RAM (``/proc/meminfo``).

    Raises:
        ValueError: where the total is unknown (a CPU without ``/proc/meminfo``, other devices).
    """
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    if device.type == "cpu" and _MEMINFO.is_file():
        for line in _MEMINFO.read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024  # reported in KiB
    raise ValueError(
        f"A fractional memory budget needs the total memory of the {device.type} device, which is unknown here. "
        "Give the budget in bytes or as a string such as '20GiB'."
    )


def read_budget(budget: float | str) -> int | float:
    """``budget`` checked: bytes (``int``), or a fraction of the device's memory (``float`` in ``(0, 1]``).

    Raises:
        ValueError: for a budget that is not positive, a fraction above 1, or an unparsable string.
        TypeError: for anything but an ``int``, ``float`` or ``str``.

    Example::

        >>> read_budget("512MiB"), read_budget(0.8)
        (536870912, 0.8)
    """
    if isinstance(budget, bool):
        raise TypeError(f"memory_budget must be bytes, a size string or a fraction, got {budget!r}.")
    if isinstance(budget, int):
        if budget <= 0:
            raise ValueError(f"memory_budget must be positive, got {budget} bytes.")
        return budget
    if isinstance(budget, float):
        if not 0 < budget <= 1:
            raise ValueError(
                f"A float memory_budget is a fraction of the device's memory and must be in (0, 1], got {budget}. "
                "Give bytes as an int or a string such as '20GiB'."
            )
        return budget
    if isinstance(budget, str):
        match = _PATTERN.match(budget)
        unit = match.group(2).lower() if match else None
        if match is None or unit not in _UNITS:
            raise ValueError(
                f"Cannot read the memory budget {budget!r}: write a number and a unit, e.g. '20GiB', '512MiB' or "
                f"'1.5GB' (units: {', '.join(u for u in _UNITS if u)}, case-insensitive)."
            )
        value = int(float(match.group(1)) * _UNITS[unit])
        if value <= 0:
            raise ValueError(f"memory_budget must be positive, got {budget!r}.")
        return value
    raise TypeError(f"memory_budget must be bytes, a size string or a fraction, got {type(budget).__name__}.")


def parse_budget(budget: float | str, device: torch.device | str = "cpu") -> int:
    """The budget in bytes.

    Args:
        budget: bytes (a positive ``int``), a size string (``"20GiB"``, ``"512 MiB"``, ``"1.5GB"``;
            ``KiB``/``MiB``/``GiB``/``TiB`` are powers of 1024, ``KB``/``MB``/``GB``/``TB`` of 1000),
            or a ``float`` in ``(0, 1]``: that fraction of ``device``'s total memory.
        device: the device a fraction refers to.

    Raises:
        ValueError: as :func:`read_budget`, and for a fraction where the device's memory is unknown.

    Example::

        >>> parse_budget("512MiB")
        536870912
        >>> parse_budget(2048)
        2048
    """
    value = read_budget(budget)
    return int(value * device_memory(torch.device(device))) if isinstance(value, float) else value
