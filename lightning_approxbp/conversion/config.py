"""Conversion options, checked once when they are built.

:class:`ConversionConfig` is the flat set of options that ``convert``, ``ApproxBP`` and YAML
configs take; it is composed of one part per technique (each a small frozen dataclass next to
its rule, with the same field names) plus the verification's. Each part checks its own
options; :meth:`ConversionConfig.part` gives a rule its part, :meth:`ConversionConfig.compose`
builds a config from parts, and :meth:`ConversionConfig.preset` gives a named one.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, TypeVar

from lightning_approxbp.conversion.activations import ActivationConfig
from lightning_approxbp.conversion.dropout import DropoutConfig
from lightning_approxbp.conversion.fused_loss import FusedLossConfig
from lightning_approxbp.conversion.gated_mlp import GatedMLPConfig
from lightning_approxbp.conversion.norms import AFFINE_STRATEGIES, NormConfig
from lightning_approxbp.errors import OptionError
from lightning_approxbp.tables import StepTable

__all__ = ["AFFINE_STRATEGIES", "PRESETS", "ConversionConfig", "VerifyConfig"]

P = TypeVar("P")


@dataclass(frozen=True)
class VerifyConfig:
    """The verification's options (the same names as in :class:`ConversionConfig`, which documents them)."""

    verify: bool = True
    tolerance: float | None = None

    def __post_init__(self) -> None:
        if self.tolerance is not None and not self.tolerance > 0:
            raise ValueError(f"tolerance must be positive, got {self.tolerance!r}.")
        if self.tolerance is not None and not self.verify:
            raise ValueError("tolerance only applies with verify=True; drop tolerance or set verify=True.")


# Checked in this order, so that the first wrong option is the one named.
_PARTS: tuple[type[Any], ...] = (
    FusedLossConfig, ActivationConfig, NormConfig, VerifyConfig, GatedMLPConfig, DropoutConfig,
)

PRESETS: dict[str, dict[str, Any]] = {
    # What this package recommends: every technique, the fitted step tables.
    "default": {},
    # Yang et al., ICML 2024, as published: ReGELU2/ReSiLU2 (the paper's 2-bit tables) and
    # memory-sharing norms (their affine merged into the next linear layers, here at compute time).
    "paper": {
        "table": "paper", "bits": 2, "gated_mlp": False, "dropout": False, "share_norm_output": False,
        "fused_loss": False,
    },
}


@dataclass(frozen=True)
class ConversionConfig:
    """What :func:`~lightning_approxbp.conversion.convert` changes.

    Args:
        activations: convert GELU/SiLU-family activations to step-derivative ones.
        norms: convert LayerNorm/RMSNorm modules to memory-sharing ones.
        dropout: replace ``torch.nn.Dropout`` modules by ones that save no mask (they redraw the
            same mask from the saved RNG state in backward; bit-identical masks and gradients).
        gated_mlp: fuse the down projection of gated MLPs (SwiGLU/GeGLU: LLaMA, Mistral, Qwen2,
            Gemma, ...) and of gated mixture-of-experts experts (Mixtral, Qwen2-MoE, ...) so that
            only the gate and up outputs are saved; exact gradients, their activation is not
            approximated.
        share_norm_output: where a norm keeps its affine because its output also feeds
            something other than linear layers (post-LN blocks: BERT, RoBERTa), its consuming
            linear layers save the norm's output itself (what the norm saves anyway) instead of
            their own autocast copy, and cast it again in backward; bit-identical gradients.
        bits: bits saved per activation element (1, 2 or 4).
        table: ``"fitted"``, ``"paper"`` (2 bits, GELU and SiLU only) or a
            :class:`~lightning_approxbp.tables.StepTable` (then one activation kind only).
        affine: how a norm's ``weight``/``bias`` are handled:
            ``"merge"`` applies them inside the consuming linear layers (exact forward and
            gradients, parameters unchanged; needs every use of the norm output to be such a
            layer), ``"keep"`` keeps them in the norm and recovers the normalised value from the
            output in backward (any consumer; needs ``|weight| >= min_keep_weight``),
            ``"auto"`` tries merge, then keep, then skips the norm.
        fused_loss: compute a transformers causal LM's training loss (``labels=...``) with the fused
            linear + cross-entropy, so that no ``tokens x vocab`` logits are built (``outputs.logits``
            is then ``None`` in training; see :mod:`~lightning_approxbp.conversion.fused_loss`).
            ``"auto"``: only where the probe shows the loss is used and the logits are not; ``True``:
            always; ``False``: never.
        verify: compare the converted model's output with the original's on the probe batch
            and undo the conversion if they differ.
        min_keep_weight: smallest ``|weight|`` (after any offset) for which ``"keep"`` is used.
        tolerance: relative output error accepted by ``verify``; default per dtype.

    Raises:
        ValueError: for an unknown option or a combination that cannot work.

    Example::

        >>> ConversionConfig.preset("paper").part(ActivationConfig)
        ActivationConfig(activations=True, bits=2, table='paper')
        >>> ConversionConfig.compose(NormConfig(affine="merge")) == ConversionConfig(affine="merge")
        True
    """

    activations: bool = ActivationConfig.activations
    norms: bool = NormConfig.norms
    gated_mlp: bool = GatedMLPConfig.gated_mlp
    dropout: bool = DropoutConfig.dropout
    share_norm_output: bool = NormConfig.share_norm_output
    bits: int = ActivationConfig.bits
    table: StepTable | str = ActivationConfig.table
    affine: str = NormConfig.affine
    fused_loss: bool | str = FusedLossConfig.fused_loss
    verify: bool = VerifyConfig.verify
    min_keep_weight: float = NormConfig.min_keep_weight
    tolerance: float | None = VerifyConfig.tolerance

    def __post_init__(self) -> None:
        if not (self.activations or self.norms or self.gated_mlp or self.dropout or self.fused_loss is True):
            raise ValueError(
                "activations=False, norms=False, gated_mlp=False and dropout=False leave nothing to convert; "
                "enable at least one (or fused_loss=True)."
            )
        for kind in _PARTS:
            self.part(kind)

    def part(self, kind: type[P]) -> P:
        """The part of type ``kind`` (a technique's config, or :class:`VerifyConfig`): its fields, as set here."""
        return kind(**{f.name: getattr(self, f.name) for f in fields(kind)})

    @classmethod
    def compose(cls, *parts: Any, **options: Any) -> ConversionConfig:
        """The config made of ``parts`` (the defaults for the parts not given), ``options`` taking precedence."""
        values = {f.name: getattr(part, f.name) for part in parts for f in fields(part)}
        return cls.build(**{**values, **options})

    @classmethod
    def preset(cls, name: str, **options: Any) -> ConversionConfig:
        """A named config (:data:`PRESETS`: ``"default"``, ``"paper"``), with ``options`` changed.

        Raises:
            OptionError: for an unknown name.
        """
        if name not in PRESETS:
            raise OptionError("preset", name, tuple(PRESETS))
        return cls.build(**{**PRESETS[name], **options})

    @classmethod
    def build(cls, config: ConversionConfig | None = None, **options: Any) -> ConversionConfig:
        """``config`` as given, or one built from ``options`` (the fields as keywords); not both.

        Raises:
            ValueError: for both at once, or an option that is not a field.
        """
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(options) - set(names))
        if unknown:
            raise ValueError(f"Unknown conversion option(s) {', '.join(unknown)}; the options are {', '.join(names)}.")
        if config is None:
            return cls(**options)
        if options:
            raise ValueError(
                f"Pass either config=ConversionConfig(...) or the options ({', '.join(sorted(options))}), not both; "
                "use dataclasses.replace(config, ...) to change a config."
            )
        if not isinstance(config, cls):
            raise TypeError(f"config must be a ConversionConfig, got {type(config).__name__}.")
        return config
