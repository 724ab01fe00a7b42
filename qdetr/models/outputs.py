"""The detector output container.

A plain ``dict`` (the keys of facebookresearch/detr) that also answers the Hugging Face
attribute names and remembers which classification head produced it, so that
:func:`qdetr.models.post_process_object_detection` can dispatch without being told.

Keys (B images, Q queries, C+1 logits, L decoder layers, d model width):

=========================  ==================  =============================================
key                        shape               contents
=========================  ==================  =============================================
``pred_logits``            (B, Q, C+1)         last layer's class logits; column C = no object
``pred_boxes``             (B, Q, 4)           last layer's boxes, normalised cxcywh in [0, 1]
``aux_outputs``            list of L-1 dicts   ``{"pred_logits", "pred_boxes"}`` of layers
                                               0..L-2 (empty when ``aux_loss=False``)
``decoder_hidden_states``  (L, B, Q, d)        every decoder layer's output after
                                               ``decoder.norm`` (what the heads read)
``co_attn_features``       (L, B, Q, d)        every decoder layer's cross-attention
                                               co-attended values ``Â·V̂`` before ``out_proj``
                                               (the Q-DETR distillation feature)
=========================  ==================  =============================================

Attribute aliases: ``logits`` -> ``pred_logits``, ``auxiliary_outputs`` -> ``aux_outputs``,
``last_hidden_state`` -> ``decoder_hidden_states[-1]``, and every key by its own name.
"""

from __future__ import annotations

from typing import Any

__all__ = ["DetectionOutput", "OUTPUT_KEYS"]

#: Keys every detector output holds.
OUTPUT_KEYS = ("pred_logits", "pred_boxes", "aux_outputs", "decoder_hidden_states", "co_attn_features")
"""Keys of every :class:`DetectionOutput`: ``pred_logits`` (B, Q, C+1), ``pred_boxes`` (B, Q, 4)
normalised cxcywh, ``aux_outputs``, ``decoder_hidden_states`` (L, B, Q, d), ``co_attn_features``
(L, B, Q, d)."""

_ALIASES = {"logits": "pred_logits", "auxiliary_outputs": "aux_outputs"}


class DetectionOutput(dict):
    """Dict of detector outputs with attribute access.

    Args:
        classification: ``"softmax"`` (DETR) or ``"sigmoid"`` (focal heads such as SMCA).
        **outputs: the tensors listed in the module docstring.

    Raises:
        AttributeError: for an attribute that is neither a key nor an alias.

    Examples:
        >>> import torch
        >>> from qdetr.models import OUTPUT_KEYS, DetectionOutput
        >>> out = DetectionOutput(
        ...     classification="softmax",
        ...     pred_logits=torch.zeros(1, 3, 6),
        ...     pred_boxes=torch.full((1, 3, 4), 0.5),
        ...     aux_outputs=[],
        ...     decoder_hidden_states=torch.zeros(2, 1, 3, 8),
        ...     co_attn_features=torch.zeros(2, 1, 3, 8),
        ... )
        >>> out.logits.shape, out.last_hidden_state.shape
        (torch.Size([1, 3, 6]), torch.Size([1, 3, 8]))
        >>> set(out) == set(OUTPUT_KEYS)
        True
    """

    def __init__(self, *, classification: str, **outputs: Any) -> None:
        super().__init__(**outputs)
        self.classification = classification

    def __getattr__(self, name: str) -> Any:
        if name == "last_hidden_state":
            return self["decoder_hidden_states"][-1]
        key = _ALIASES.get(name, name)
        try:
            return self[key]
        except KeyError:
            raise AttributeError(f"DetectionOutput has no key or attribute {name!r}; keys: {list(self)}") from None

    def __reduce__(self):  # keep pickling/deepcopy simple
        return (_rebuild, (self.classification, dict(self)))


def _rebuild(classification: str, items: dict) -> DetectionOutput:
    return DetectionOutput(classification=classification, **items)
