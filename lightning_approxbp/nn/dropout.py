"""Dropout that saves no mask for backward (it redraws it from the saved RNG state)."""

from __future__ import annotations

from torch import Tensor, nn

from lightning_approxbp.ops.dropout import regenerated_dropout


class RegeneratedDropout(nn.Dropout):
    """``nn.Dropout`` with the same masks and gradients, keeping no mask for backward.

    A subclass of :class:`torch.nn.Dropout` (same ``p``, no parameters), so code that looks for
    dropout modules still finds it. See :mod:`lightning_approxbp.ops.dropout`.

    Example::

        >>> import torch
        >>> layer = RegeneratedDropout(0.1)
        >>> layer(torch.randn(2, 4, requires_grad=True)).sum().backward()
    """

    @classmethod
    def from_module(cls, dropout: nn.Dropout) -> RegeneratedDropout:
        """The replacement of ``dropout``: the same ``p``, in its train mode."""
        new = cls(dropout.p)
        new.train(dropout.training)
        return new

    def forward(self, x: Tensor) -> Tensor:
        return regenerated_dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}, approxbp: mask redrawn in backward, none saved"
