"""Labelled records for classification: the label set, and text records read from a file or the hub.

    {"text": "a gripping thriller", "label": "positive"}                 one sentence
    {"text": "A man sleeps.", "text_pair": "A person rests.", "label": 1}  a sentence pair

`sentence` / `sentence1` also name the text and `sentence2` the pair (GLUE's columns). Sources: a `.jsonl` /
`.json` file or a hub dataset (`pissa.data.records`), or a `.csv` file with a header row. Labels are names
(strings) or whole numbers; the label set is the sorted set of names in the training data (numbers in numeric
order, so labels 0..K-1 keep their ids), and it is saved in the model's config (id2label) so that evaluation
checks its data against the labels the head was trained on. Every record that lacks a label is refused with its
file and line, before any model is loaded.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

from ..errors import PissaError
from .records import decode_text, load_records

TEXT_FIELDS = ("text", "sentence", "sentence1")
PAIR_FIELDS = ("text_pair", "sentence2")
LABEL_FIELD = "label"
DEFAULT_NAME = "LABEL_{}"  # transformers' id2label of a head nobody named


def label_name(value, where: str) -> str:
    """A label as the name the label set keys it by: strings as they are, whole numbers as digits."""
    if value is None or (isinstance(value, str) and not value.strip()):
        raise PissaError(f"{where} has no `{LABEL_FIELD}`; every record needs one (a name or a whole number)")
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        if not value.is_integer():
            raise PissaError(f"{where}: label {value} is not a class (a fractional number is a regression "
                             "target); classification needs names or whole numbers")
        value = int(value)
    if isinstance(value, int):
        if value < 0:
            raise PissaError(f"{where}: label {value} marks an unlabelled record (as in GLUE's test splits); use a "
                             "labelled split")
        return str(value)
    if isinstance(value, str):
        return value.strip()
    raise PissaError(f"{where}: label {value!r} is a {type(value).__name__}; give a name or a whole number")


@dataclass(frozen=True)
class LabelSet:
    """The classes of a head: `names[i]` is class id i."""

    names: tuple[str, ...]

    @classmethod
    def of(cls, labels: list[str], source: str) -> LabelSet:
        names = set(labels)
        if len(names) < 2:
            raise PissaError(f"{source} has {len(names)} distinct label ({', '.join(names)}); a classifier needs at "
                             "least 2 classes")
        numeric = all(n.isdigit() for n in names)
        return cls(tuple(sorted(names, key=int if numeric else str)))

    @classmethod
    def of_config(cls, hf_config) -> LabelSet:
        """The labels a saved head was trained on (its config's id2label)."""
        id2label = {int(k): v for k, v in (hf_config.id2label or {}).items()}
        return cls(tuple(id2label[i] for i in range(len(id2label))))

    @property
    def named(self) -> bool:
        """False for transformers' default names LABEL_0, LABEL_1, ...: the head's classes are ids only."""
        return self.names != tuple(DEFAULT_NAME.format(i) for i in range(len(self.names)))

    def config_kwargs(self) -> dict:
        """num_labels, id2label, label2id for from_pretrained: the label names go into the model's config."""
        return {"num_labels": len(self.names), "id2label": dict(enumerate(self.names)),
                "label2id": {n: i for i, n in enumerate(self.names)}}

    def ids(self, labels: list[str], source: str) -> list[int]:
        """Class ids of `labels`, refusing a label the head has no class for."""
        lookup = {n: i for i, n in enumerate(self.names)}
        if not self.named:  # a head with ids only: labels 0..K-1 are its ids
            lookup.update({str(i): i for i in range(len(self.names))})
        unknown = sorted(set(labels) - set(lookup))
        if unknown:
            raise PissaError(f"{source} has labels the classifier was not trained on: {', '.join(unknown[:5])} (its "
                             f"labels: {', '.join(self.names)}); evaluate on data with the training label set, or "
                             "train on data that has these labels")
        return [lookup[label] for label in labels]


@dataclass
class LabelledTexts:
    texts: list[str]
    pairs: list[str] | None  # the second sentence of each pair, or None for single sentences
    labels: list[str]
    source: str

    def __len__(self) -> int:
        return len(self.labels)


def read_csv(path: Path) -> list[tuple[dict, str]]:
    """(record, where) per row of a CSV file with a header row."""
    if not path.is_file():
        raise PissaError(f"data file {path} does not exist; give a .csv/.jsonl/.json file or a hub dataset name")
    reader = csv.DictReader(io.StringIO(decode_text(path)))
    return [(row, f"{path} line {i}") for i, row in enumerate(reader, 2)]


def field_of(record: dict, names: tuple[str, ...]) -> str | None:
    return next((n for n in names if n in record), None)


def read_labelled_texts(spec: str | Path, limit: int | None = None) -> LabelledTexts:
    """The text, optional pair and label of every record of `spec`, refusing a record without them."""
    spec = str(spec)
    if spec.endswith(".csv"):
        pairs = read_csv(Path(spec).expanduser())[:limit] if limit else read_csv(Path(spec).expanduser())
        source = spec
        if not pairs:
            raise PissaError(f"dataset {spec} is empty; it must hold at least one record")
    else:
        pairs, source = load_records(spec, limit)
    first, where = pairs[0]
    text, pair = field_of(first, TEXT_FIELDS), field_of(first, PAIR_FIELDS)
    if text is None:
        raise PissaError(f"{where} has no text field ({', '.join(TEXT_FIELDS)}); classification records are "
                         f"{{\"text\": ..., \"label\": ...}}, optionally with \"text_pair\"")
    texts, seconds, labels = [], [], []
    for record, where in pairs:
        for name in (text, pair) if pair else (text,):
            if not isinstance(record.get(name), str):
                raise PissaError(f"{where}: `{name}` must be a string (the first record has it), got "
                                 f"{type(record.get(name)).__name__}")
        texts.append(record[text])
        seconds.append(record[pair] if pair else None)
        labels.append(label_name(record.get(LABEL_FIELD), where))
    return LabelledTexts(texts, seconds if pair else None, labels, source)


def encode_texts(data: LabelledTexts, tokenizer, label_set: LabelSet, max_length: int) -> tuple[list[dict], int]:
    """Tokenized rows {input_ids, attention_mask, (token_type_ids,) labels} and how many were truncated to
    `max_length` tokens."""
    ids = label_set.ids(data.labels, data.source)
    full = tokenizer(data.texts, data.pairs)["input_ids"]
    encoded = tokenizer(data.texts, data.pairs, truncation=True, max_length=max_length)
    rows = [{**{k: v[i] for k, v in encoded.items()}, "labels": ids[i]} for i in range(len(ids))]
    return rows, sum(len(f) > max_length for f in full)
