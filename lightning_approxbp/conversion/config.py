"""Conversion options, checked once when they are built."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from lightning_approxbp.errors import OptionError
from lightning_approxbp.tables import SUPPORTED_BITS, TABLE_KINDS, StepTable, has_table

AFFINE_STRATEGIES: tuple[str, ...] = ("auto", "merge", "keep")
DEFAULT_MIN_KEEP_WEIGHT = 1e-2


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
    """

    activations: bool = True
    norms: bool = True
    gated_mlp: bool = True
    dropout: bool = True
    share_norm_output: bool = True
    bits: int = 2
    table: StepTable | str = "fitted"
    affine: str = "auto"
    fused_loss: bool | str = "auto"
    verify: bool = True
    min_keep_weight: float = DEFAULT_MIN_KEEP_WEIGHT
    tolerance: float | None = None

    def __post_init__(self) -> None:
        if not (self.activations or self.norms or self.gated_mlp or self.dropout or self.fused_loss is True):
            raise ValueError(
                "activations=False, norms=False, gated_mlp=False and dropout=False leave nothing to convert; "
                "enable at least one (or fused_loss=True)."
            )
        if not (isinstance(self.fused_loss, bool) or self.fused_loss == "auto"):
            raise ValueError(f"fused_loss={self.fused_loss!r} is unknown; use True, False or 'auto'.")
        if isinstance(self.bits, bool) or self.bits not in SUPPORTED_BITS:
            raise OptionError("bits", self.bits, SUPPORTED_BITS)
        if isinstance(self.table, StepTable):
            if self.table.bits != self.bits:
                raise ValueError(
                    f"The table has {self.table.bits} bits but bits={self.bits}; pass bits={self.table.bits}."
                )
        elif self.table not in TABLE_KINDS:
            raise OptionError("table", self.table, TABLE_KINDS, extra="or a StepTable")
        elif self.table == "paper" and self.bits != 2:
            raise ValueError(f"The paper's tables have 2 bits; pass bits=2 or table='fitted' (got bits={self.bits}).")
        if self.affine not in AFFINE_STRATEGIES:
            raise OptionError("affine", self.affine, AFFINE_STRATEGIES)
        if self.affine != "auto" and not self.norms:
            raise ValueError(f"affine={self.affine!r} only applies to norms, but norms=False; drop affine or set norms=True.")
        if not self.min_keep_weight > 0:
            raise ValueError(f"min_keep_weight must be positive, got {self.min_keep_weight!r}.")
        if self.tolerance is not None and not self.tolerance > 0:
            raise ValueError(f"tolerance must be positive, got {self.tolerance!r}.")
        if self.tolerance is not None and not self.verify:
            raise ValueError("tolerance only applies with verify=True; drop tolerance or set verify=True.")

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

    def table_for(self, activation: str) -> StepTable | str | None:
        """The table to use for ``activation``, or ``None`` when ``table`` cannot serve it."""
        if isinstance(self.table, StepTable):
            return self.table if self.table.activation == activation else None
        if not has_table(activation, self.bits, self.table):
            return None
        return self.table
