"""Dropout that saves no full mask for backward (it redraws it, or keeps it as bits)."""

from __future__ import annotations

from torch import Tensor, nn

from lightning_approxbp.ops.dropout import (
    MaskStorage,
    check_mask_storage,
    regenerated_dropout,
)


class RegeneratedDropout(nn.Dropout):
    """``nn.Dropout`` with the same masks and gradients, keeping no full mask for backward.

    A subclass of :class:`torch.nn.Dropout` (same ``p``, no parameters), so code that looks for
    dropout modules still finds it. ``mask_storage="auto"`` redraws the mask in backward on CUDA
    and keeps it packed one bit per element elsewhere (CPU random numbers are drawn serially);
    see :mod:`lightning_approxbp.ops.dropout`.

    Example::

        >>> import torch
        >>> layer = RegeneratedDropout(0.1)
        >>> layer(torch.randn(2, 4, requires_grad=True)).sum().backward()
    """

    def __init__(self, p: float = 0.5, mask_storage: MaskStorage = "auto") -> None:
        super().__init__(p)
        self.mask_storage = check_mask_storage(mask_storage)  # a wrong name fails here, not mid-fit

    @classmethod
    def from_module(cls, dropout: nn.Dropout) -> RegeneratedDropout:
        """The replacement of ``dropout``: the same ``p``, in its train mode."""
        new = cls(dropout.p)
        new.train(dropout.training)
        return new

    def forward(self, x: Tensor) -> Tensor:
        return regenerated_dropout(x, self.p, self.training, self.mask_storage)

    def extra_repr(self) -> str:
        how = {"auto": "redrawn in backward on CUDA, 1 bit per element elsewhere", "regenerate": "redrawn in backward",
               "bits": "1 bit per element"}[self.mask_storage]
        return f"p={self.p}, approxbp: mask {how}"
