"""The LM head a fused-loss conversion puts in place (see :mod:`lightning_approxbp.conversion.fused_loss`)."""

from __future__ import annotations

from torch import Tensor, nn

from lightning_approxbp.nn.shared_input import norm_affine


class FusedLMHead(nn.Module):
    """An LM head that can hand its input to the fused loss instead of computing logits.

    Holds the original head's ``weight`` and ``bias`` (the same parameter objects, so the state
    dict is unchanged) and the original head itself as a plain reference. Unless
    :attr:`capturing` is set (by the model's pre-hook), it runs the original head. A head that
    applies a merged norm affine (:class:`~lightning_approxbp.nn.shared_input.AffineMergedLinear`,
    the default conversion of the final norm) applies it to the captured input too.
    """

    def __init__(self, head: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = head.in_features, head.out_features
        self.weight = head.weight
        self.bias = head.bias
        self.__dict__["unfused"] = head
        self.training = head.training
        self.capturing = False
        self.captured: Tensor | None = None

    @classmethod
    def from_module(cls, head: nn.Linear) -> FusedLMHead:
        """The fused-loss head in place of ``head`` (an ``nn.Linear`` or a merged/input-sharing one)."""
        return cls(head)

    def forward(self, hidden: Tensor) -> Tensor:
        if not self.capturing:
            return self.unfused(hidden)
        self.captured = self._affine_input(hidden)
        # An empty stand-in, so that what the model does to its logits (e.g. soft-capping) costs nothing.
        return hidden.new_empty(*hidden.shape[:-1], 0)

    def _affine_input(self, hidden: Tensor) -> Tensor:
        source = getattr(self.unfused, "affine_source", None)
        if source is None:
            return hidden
        gamma, beta, offset = norm_affine(source)
        if gamma is not None:
            hidden = hidden * (gamma + offset)
        return hidden if beta is None else hidden + beta

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, fused loss"
