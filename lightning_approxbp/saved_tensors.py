"""Count the bytes autograd keeps for backward: the activation memory this package reduces.

Counting goes through :func:`torch.autograd.graph.saved_tensors_hooks`, so it is exact and
device independent (it runs on CPU). Every storage is counted once, however many ops save it
or views of it, and storages that belong to parameters are reported apart: autograd keeps a
reference to them, not a copy.

Example::

    >>> import torch
    >>> layer = torch.nn.Linear(4, 4)
    >>> with SavedTensorCounter(exclude=layer.parameters()) as counter:
    ...     out = layer(torch.randn(2, 4, requires_grad=True)).relu()
    >>> counter.stats.activation_bytes        # the linear's input and relu's output
    64
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from types import TracebackType

import torch
from torch import Tensor


@dataclass
class SavedTensorStats:
    """What one region of code saved for backward.

    Attributes:
        activation_bytes: bytes of unique storages saved, parameters excluded.
        parameter_bytes: bytes of parameter storages referenced (not copies).
        bytes_by_dtype: ``activation_bytes`` split by dtype name.
    """

    activation_bytes: int = 0
    parameter_bytes: int = 0
    bytes_by_dtype: dict[str, int] = field(default_factory=dict)


class SavedTensorCounter:
    """Context manager that records every tensor saved for backward inside it.

    Args:
        exclude: tensors (usually ``module.parameters()``) whose storages count as parameters.
    """

    def __init__(self, exclude: Iterable[Tensor] = ()) -> None:
        self._parameter_storages = {_storage_key(t) for t in exclude}
        self._seen: set[tuple[int, str]] = set()
        self.stats = SavedTensorStats()
        self._hooks: torch.autograd.graph.saved_tensors_hooks | None = None

    def _pack(self, tensor: Tensor) -> Tensor:
        # Kept detached: a saved *output* kept as itself would point back at its own grad_fn, a
        # cycle through C++ that Python's gc cannot see, so a graph never run backward (a probe,
        # an evaluation) would keep every tensor and parameter it reached alive for good.
        key = _storage_key(tensor)
        if key not in self._seen:
            self._seen.add(key)
            nbytes = tensor.untyped_storage().nbytes()
            if key in self._parameter_storages:
                self.stats.parameter_bytes += nbytes
            else:
                self.stats.activation_bytes += nbytes
                dtype = str(tensor.dtype).removeprefix("torch.")
                self.stats.bytes_by_dtype[dtype] = self.stats.bytes_by_dtype.get(dtype, 0) + nbytes
        return tensor.detach()

    def __enter__(self) -> SavedTensorCounter:
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, _unpack)
        self._hooks.__enter__()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._hooks is None:
            raise RuntimeError("SavedTensorCounter exited without being entered.")
        self._hooks.__exit__(exc_type, exc, tb)
        self._hooks = None


def _unpack(tensor: Tensor) -> Tensor:
    return tensor


def storage_id(tensor: Tensor) -> int:
    """An id of ``tensor``'s storage, shared by all its views, while the storage lives.

    The storage object itself, not its data pointer: tensors without data (meta, fake) have a
    null data pointer, but each its own storage.
    """
    return tensor.untyped_storage()._cdata


def _storage_key(tensor: Tensor) -> tuple[int, str]:
    return storage_id(tensor), str(tensor.device)


def count_saved_bytes(module: torch.nn.Module, *args: object, **kwargs: object) -> SavedTensorStats:
    """Run ``module(*args, **kwargs)`` and return what it saved for backward.

    The output is discarded, so the saved tensors are freed on return.
    """
    with SavedTensorCounter(exclude=module.parameters()) as counter:
        module(*args, **kwargs)
    return counter.stats
