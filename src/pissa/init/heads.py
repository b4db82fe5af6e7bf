"""The head of a classifier and the body its adapters go on.

A transformers classifier is its pretrained backbone (`model.<base_model_prefix>`: `bert`, `vit`, `deberta`, ...)
plus what the task adds: `classifier` (and DeBERTa's `pooler`, ...). The head is every top-level module with
weights outside the backbone; it is trained in full and saved in the adapter (PEFT `modules_to_save`), as the
paper trains GLUE's classifier heads beside the adapters. The default targets are the backbone's linear layers
(and, for an image model, its Conv2d patch embedding), by leaf name, so the head is never adapted.
"""

from __future__ import annotations

from torch import nn

from ..errors import PissaError
from ..layout import CONV1D, CONV2D, LINEAR, kind_of


def head_modules(model: nn.Module) -> list[str]:
    """Top-level modules with weights outside the backbone: the task head (`classifier`, ...)."""
    backbone = getattr(model, getattr(model, "base_model_prefix", ""), None)
    if backbone is None or backbone is model:
        raise PissaError(f"{type(model).__name__} has no separate backbone (base_model_prefix), so its head cannot "
                         "be told from its body; use a transformers *ForSequenceClassification / "
                         "*ForImageClassification model")
    return [name for name, child in model.named_children()
            if child is not backbone and any(True for _ in child.parameters())]


def in_head(name: str, head: list[str]) -> bool:
    return any(name == h or name.startswith(h + ".") for h in head)


def body_targets(model: nn.Module, head: list[str], conv: bool) -> list[str]:
    """Leaf names of the backbone's linear layers (and Conv2d with `conv`), as PEFT's `target_modules`; full
    names instead when a leaf name also occurs in the head (RoBERTa's `classifier.dense`)."""
    kinds = (LINEAR, CONV1D, CONV2D) if conv else (LINEAR, CONV1D)
    layers = {n: in_head(n, head) for n, m in model.named_modules() if kind_of(m) in kinds}
    body = sorted({n.rsplit(".", 1)[-1] for n, is_head in layers.items() if not is_head})
    if any(is_head and n.rsplit(".", 1)[-1] in body for n, is_head in layers.items()):
        return sorted(n for n, is_head in layers.items() if not is_head)
    if not body:
        raise PissaError(f"{type(model).__name__} has no linear layers outside its head to adapt; pass --targets")
    return body
