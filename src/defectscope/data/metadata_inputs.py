"""Metadata columns of the dataset table as model inputs: one fixed encoding, shared by training and deployment.

A model trained with ``model.metadata_inputs: [type]`` (or ``[lib, window]``) sees, beside the image, a float
vector built here: categorical columns one-hot encoded over the categories fixed at training, numeric columns
standardised with the training split's mean and standard deviation. The encoding is saved in the model spec
(``metadata_inputs``) and carried into the exported ONNX file, so the torch-free predictor encodes a line's
values exactly as training did. numpy and the standard library only (the predictor imports this module).

Column kinds: ``name`` alone is numeric when every value parses as a number and there are more than
:data:`MAX_AUTO_CATEGORIES` distinct values, else categorical (an ID such as window ``2003`` is a category);
``name:categorical`` or ``name:numeric`` forces the kind.

Refusals, never silent guesses: a missing or empty value, a non-number for a numeric field, and a category
not seen at training raise :class:`MetadataInputError` naming the field (and the known values). An unseen
category is an unseen product or tool: the model has no basis to judge it, so it is an error, not an
all-zero vector.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from defectscope.errors import DefectscopeError

MAX_AUTO_CATEGORIES = 20
KINDS = ("categorical", "numeric")


class MetadataInputError(DefectscopeError, ValueError):
    """A metadata value the model cannot use (missing, empty, not a number, unknown category)."""


@dataclass(frozen=True)
class MetadataField:
    name: str
    kind: str  # categorical | numeric
    categories: tuple[str, ...] = ()  # categorical: one-hot order
    mean: float = 0.0  # numeric: standardisation, from the training split
    std: float = 1.0

    @property
    def width(self) -> int:
        return len(self.categories) if self.kind == "categorical" else 1

    def to_dict(self) -> dict[str, Any]:
        if self.kind == "categorical":
            return {"name": self.name, "kind": self.kind, "categories": list(self.categories)}
        return {"name": self.name, "kind": self.kind, "mean": self.mean, "std": self.std}

    def encode(self, value: Any, out: np.ndarray) -> None:
        """Write this field's encoding of ``value`` into ``out`` (a zeroed slice of width :attr:`width`)."""
        text = _text(value)
        if text is None:
            raise MetadataInputError(f"metadata field {self.name!r} is missing or empty; the model needs it"
                                     + (f" (one of {', '.join(self.categories)})" if self.categories else ""))
        if self.kind == "categorical":
            try:
                out[self.categories.index(text)] = 1.0
            except ValueError:
                raise MetadataInputError(f"metadata field {self.name!r}: unknown value {text!r}; the model knows "
                                         f"{', '.join(map(repr, self.categories))}") from None
            return
        number = _number(text)
        if number is None:
            raise MetadataInputError(f"metadata field {self.name!r}: expected a number, got {text!r}")
        out[0] = (number - self.mean) / self.std


def _text(value: Any) -> str | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    text = str(value).strip()
    return text or None


def _number(text: str) -> float | None:
    try:
        number = float(text)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


class MetadataEncoder:
    """Dicts or table rows of metadata values -> float32 vectors (N, :attr:`dim`)."""

    def __init__(self, fields: Iterable[MetadataField]):
        self.fields = tuple(fields)
        self.dim = sum(f.width for f in self.fields)

    def __repr__(self) -> str:
        return f"MetadataEncoder({', '.join(f'{f.name}:{f.kind}' for f in self.fields)}; dim {self.dim})"

    @property
    def names(self) -> list[str]:
        return [f.name for f in self.fields]

    @classmethod
    def fit(cls, table: Any, columns: Iterable[str], train_rows: np.ndarray | None = None) -> MetadataEncoder:
        """Fix the encoding from a dataset table (pandas): ``columns`` as in the config (``name[:kind]``).

        Categories come from every row of the table (the value set is not a label, and a value that only
        occurs in the test split must still be encodable there); numeric statistics from ``train_rows``
        (a boolean mask; default all rows).
        """
        fields = []
        for entry in columns:
            name, _, kind = str(entry).partition(":")
            name, kind = name.strip(), kind.strip()
            if kind and kind not in KINDS:
                raise MetadataInputError(f"metadata input {entry!r}: kind must be one of {', '.join(KINDS)}")
            if name not in table.columns:
                have = [c for c in table.columns if c not in ("path", "label", "split", "source")]
                raise MetadataInputError(f"metadata input {name!r} is not a column of the dataset table; "
                                         f"its metadata columns are: {', '.join(have) or '(none)'}")
            texts = [_text(v) for v in table[name].tolist()]
            empty = [i for i, t in enumerate(texts) if t is None]
            if empty:
                where = ", ".join(str(table["source"].iloc[i]) if "source" in table.columns else str(i)
                                  for i in empty[:5])
                raise MetadataInputError(f"metadata input {name!r} is empty in {len(empty)} row(s) ({where}"
                                         f"{', ...' if len(empty) > 5 else ''}); fill them or drop the input")
            numbers = [_number(t) for t in texts]  # type: ignore[arg-type]
            distinct = sorted(set(texts))  # type: ignore[type-var]
            if not kind:
                numeric = all(n is not None for n in numbers) and len(distinct) > MAX_AUTO_CATEGORIES
                kind = "numeric" if numeric else "categorical"
            if kind == "categorical":
                fields.append(MetadataField(name, kind, tuple(distinct)))
                continue
            bad = [t for t, n in zip(texts, numbers, strict=True) if n is None]
            if bad:
                raise MetadataInputError(f"metadata input {name!r} is numeric but has non-numbers such as {bad[0]!r}")
            values = np.asarray(numbers, dtype=float)
            if train_rows is not None and np.asarray(train_rows).any():
                values = values[np.asarray(train_rows, dtype=bool)]
            std = float(values.std())
            fields.append(MetadataField(name, kind, mean=float(values.mean()), std=std if std > 0 else 1.0))
        names = [f.name for f in fields]
        if len(set(names)) != len(names):
            raise MetadataInputError(f"metadata inputs name a column twice: {names}")
        return cls(fields)

    def to_spec(self) -> list[dict[str, Any]]:
        return [f.to_dict() for f in self.fields]

    @classmethod
    def from_spec(cls, spec: list[dict[str, Any]] | None) -> MetadataEncoder | None:
        """The encoder a model spec describes, or None for a model without metadata inputs."""
        if not spec:
            return None
        fields = []
        for d in spec:
            if d.get("kind") == "categorical":
                fields.append(MetadataField(str(d["name"]), "categorical", tuple(map(str, d["categories"]))))
            elif d.get("kind") == "numeric":
                fields.append(MetadataField(str(d["name"]), "numeric", mean=float(d["mean"]), std=float(d["std"])))
            else:
                raise MetadataInputError(f"metadata input {d.get('name')!r}: unknown kind {d.get('kind')!r}")
        return cls(fields)

    def encode(self, values: Mapping[str, Any] | None) -> np.ndarray:
        """One item's values (field name -> value; extra keys are ignored) -> float32 (dim,)."""
        values = values or {}
        out = np.zeros(self.dim, np.float32)
        start = 0
        for f in self.fields:
            f.encode(values.get(f.name), out[start:start + f.width])
            start += f.width
        return out

    def encode_rows(self, rows: Iterable[Mapping[str, Any]]) -> np.ndarray:
        vectors = [self.encode(r) for r in rows]
        return np.stack(vectors) if vectors else np.zeros((0, self.dim), np.float32)

    def encode_table(self, table: Any) -> np.ndarray:
        """Rows of a pandas table -> float32 (len(table), dim)."""
        missing = [n for n in self.names if n not in table.columns]
        if missing:
            raise MetadataInputError(f"the model needs metadata column(s) {', '.join(map(repr, missing))}, "
                                     f"which the table lacks")
        return self.encode_rows(table[self.names].to_dict("records"))

    def describe(self) -> str:
        """For messages: ``lib (one of Die01, Die02), window (number)``."""
        return ", ".join(f"{f.name} (one of {', '.join(f.categories)})" if f.kind == "categorical"
                         else f"{f.name} (number)" for f in self.fields)
