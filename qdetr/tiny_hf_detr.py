"""Tiny, offline Hugging Face DETR-family detectors for tests, examples and benchmarks.

Every DETR-style ``*ForObjectDetection`` class of the installed ``transformers`` is built
from a config (no download, no timm): hidden size 32, 2 heads, 1 encoder / 3 decoder
layers, 5 queries, 3 labels, 2 sampling points, a small ResNet / HGNetV2 / ViT / Swin backbone, on
2 x 3 x 64 x 64 images. The settings follow ``detr-family.md`` section 5.

:func:`build_tiny_hf_detr` returns a :class:`TinyHFDetr` holding the model, the keyword
arguments of its ``forward`` and, for models that can compute their own loss, a batch of
labels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

__all__ = ["TINY_HF_DETR_NAMES", "TinyHFDetr", "build_tiny_hf_detr"]

_BATCH = 2
_IMAGE = 64
_NUM_LABELS = 3


@dataclass
class TinyHFDetr:
    """A tiny transformers detector with a matching batch.

    Attributes:
        name: key in :data:`TINY_HF_DETR_NAMES`, e.g. ``"rt_detr"``.
        cls: the ``*ForObjectDetection`` class.
        model: the model, in training mode, float32, random weights.
        inputs: keyword arguments for ``model(**inputs)``: ``pixel_values`` (2, 3, 64, 64),
            ``pixel_mask`` (2, 64, 64) where the model takes one, plus text inputs for the
            grounding models.
        labels: one dict per image with ``class_labels`` (n,) int64 and ``boxes`` (n, 4)
            normalised cxcywh, for ``model(**inputs, labels=labels)``; None where the
            transformers model cannot compute its loss (OmDet-Turbo takes no labels; the
            PP-DocLayout V2 / V3 / V4 detectors raise "does not support training").

    Examples:
        >>> tiny = build_tiny_hf_detr("detr")
        >>> tiny.cls.__name__, tuple(tiny.inputs["pixel_values"].shape)
        ('DetrForObjectDetection', (2, 3, 64, 64))
        >>> sorted(tiny.labels[0])
        ['boxes', 'class_labels']
    """

    name: str
    cls: type
    model: nn.Module
    inputs: dict[str, torch.Tensor]
    labels: list[dict[str, torch.Tensor]] | None

    def forward(self, *, with_labels: bool = False) -> Any:
        """Run ``model(**inputs)`` (with ``labels`` when asked and available).

        Examples:
            >>> out = build_tiny_hf_detr("detr").forward()
            >>> tuple(out.pred_boxes.shape)           # (B, Q, 4)
            (2, 5, 4)
        """
        kwargs = dict(self.inputs)
        if with_labels and self.labels is not None:
            kwargs["labels"] = self.labels
        return self.model(**kwargs)


def _resnet(out_features: list[str]):
    from transformers import ResNetConfig

    return ResNetConfig(
        num_channels=3,
        embedding_size=8,
        hidden_sizes=[16, 16, 32, 32],
        depths=[1, 1, 1, 1],
        layer_type="basic",
        out_features=out_features,
    )


def _rt_resnet():
    from transformers import RTDetrResNetConfig

    return RTDetrResNetConfig(
        embedding_size=16,
        hidden_sizes=[16, 16, 32, 32],
        depths=[1, 1, 1, 1],
        layer_type="basic",
        out_features=["stage2", "stage3", "stage4"],
    )


def _hgnet(out_features: list[str]):
    from transformers import HGNetV2Config

    return HGNetV2Config(
        embedding_size=16,
        depths=[1, 1, 1, 1],
        hidden_sizes=[16, 16, 32, 32],
        stem_channels=[3, 8, 8],
        stage_in_channels=[8, 16, 16, 32],
        stage_mid_channels=[8, 8, 16, 16],
        stage_out_channels=[16, 16, 32, 32],
        stage_num_blocks=[1, 1, 1, 1],
        stage_numb_of_layers=[1, 1, 1, 1],
        out_features=out_features,
    )


def _detr_common(stages: list[str]) -> dict[str, Any]:
    return dict(
        use_timm_backbone=False,
        use_pretrained_backbone=False,
        backbone_config=_resnet(stages),
        d_model=32,
        encoder_layers=1,
        decoder_layers=3,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        num_queries=5,
        num_labels=_NUM_LABELS,
    )


def _deformable_common() -> dict[str, Any]:
    return dict(
        _detr_common(["stage3", "stage4"]),
        num_feature_levels=2,
        encoder_n_points=2,
        decoder_n_points=2,
    )


def _rt_common() -> dict[str, Any]:
    return dict(
        backbone_config=_rt_resnet(),
        use_timm_backbone=False,
        use_pretrained_backbone=False,
        d_model=32,
        encoder_hidden_dim=32,
        encoder_in_channels=[16, 32, 32],
        feat_strides=[8, 16, 32],
        encoder_layers=1,
        encoder_ffn_dim=32,
        encoder_attention_heads=2,
        decoder_in_channels=[32, 32, 32],
        num_feature_levels=3,
        decoder_layers=3,
        decoder_ffn_dim=32,
        decoder_attention_heads=2,
        decoder_n_points=2,
        num_queries=5,
        num_denoising=4,
        num_labels=_NUM_LABELS,
    )


def _doclayout_common(stages: list[str]) -> dict[str, Any]:
    kw = _rt_common()
    del kw["d_model"]  # PP-DocLayoutV4 names it hidden_size; each caller sets its own
    return dict(kw, backbone_config=_hgnet(stages), global_pointer_head_size=16)


def _lw_common() -> dict[str, Any]:
    return dict(
        d_model=32,
        decoder_layers=3,
        decoder_self_attention_heads=2,
        decoder_cross_attention_heads=2,
        decoder_ffn_dim=32,
        decoder_n_points=2,
        num_queries=5,
        group_detr=2,
        projector_scale_factors=[1.0],
        num_labels=_NUM_LABELS,
    )


def _grounding_common() -> dict[str, Any]:
    from transformers import BertConfig

    return dict(
        backbone_config=_resnet(["stage3", "stage4"]),
        use_timm_backbone=False,
        use_pretrained_backbone=False,
        text_config=BertConfig(
            vocab_size=1100,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=32,
        ),
        d_model=32,
        encoder_layers=1,
        decoder_layers=3,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        num_queries=5,
        num_feature_levels=2,
        encoder_n_points=2,
        decoder_n_points=2,
        max_text_len=8,
    )


def _config(name: str):
    import transformers as tf

    if name == "detr":
        return tf.DetrConfig(**_detr_common(["stage4"]))
    if name == "conditional_detr":
        return tf.ConditionalDetrConfig(**_detr_common(["stage4"]))
    if name == "table_transformer":
        return tf.TableTransformerConfig(**_detr_common(["stage4"]))
    if name == "dab_detr":
        kw = _detr_common(["stage4"])
        kw["hidden_size"] = kw.pop("d_model")
        return tf.DabDetrConfig(**kw)
    if name == "deformable_detr":
        return tf.DeformableDetrConfig(**_deformable_common())
    if name == "deformable_detr_two_stage":
        return tf.DeformableDetrConfig(
            **_deformable_common(), two_stage=True, with_box_refine=True, two_stage_num_proposals=5
        )
    if name == "rt_detr":
        return tf.RTDetrConfig(**_rt_common())
    if name == "rt_detr_v2":
        return tf.RTDetrV2Config(**_rt_common(), decoder_n_levels=3)
    if name == "d_fine":
        return tf.DFineConfig(**_rt_common())
    if name == "deimv2":
        return tf.Deimv2Config(**_rt_common())
    if name == "pp_doclayout_v2":
        from transformers.models.pp_doclayout_v2.configuration_pp_doclayout_v2 import PPDocLayoutV2ReadingOrderConfig

        reading_order = PPDocLayoutV2ReadingOrderConfig(
            hidden_size=32,
            num_attention_heads=2,
            intermediate_size=32,
            num_hidden_layers=1,
            coordinate_size=8,
            shape_size=8,
            num_classes=_NUM_LABELS,
            global_pointer_head_size=16,
        )
        return tf.PPDocLayoutV2Config(
            **_doclayout_common(["stage2", "stage3", "stage4"]),
            d_model=32,
            reading_order_config=reading_order,
            class_thresholds=[0.5] * _NUM_LABELS,
            class_order=list(range(_NUM_LABELS)),
        )
    if name == "pp_doclayout_v3":  # stage1 feeds the mask branch
        return tf.PPDocLayoutV3Config(
            **_doclayout_common(["stage1", "stage2", "stage3", "stage4"]),
            d_model=32,
            mask_feature_channels=[16, 16],
            x4_feat_dim=16,
            num_prototypes=8,
        )
    if name == "pp_doclayout_v4":
        return tf.PPDocLayoutV4Config(**_doclayout_common(["stage2", "stage3", "stage4"]), hidden_size=32)
    if name == "lw_detr":
        backbone = tf.LwDetrViTConfig(
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            window_block_indices=[0],
            out_indices=[2],
            num_windows=4,
            image_size=_IMAGE,
            patch_size=8,
        )
        return tf.LwDetrConfig(backbone_config=backbone, **_lw_common())
    if name == "rf_detr":
        backbone = tf.RfDetrDinov2Config(
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=32,
            image_size=_IMAGE,
            patch_size=8,
            out_features=["stage1", "stage2"],
            num_register_tokens=0,
        )
        return tf.RfDetrConfig(backbone_config=backbone, intermediate_size=32, **_lw_common())
    if name == "grounding_dino":
        return tf.GroundingDinoConfig(**_grounding_common())
    if name == "mm_grounding_dino":
        return tf.MMGroundingDinoConfig(**_grounding_common())
    if name == "omdet_turbo":
        return tf.OmDetTurboConfig(
            backbone_config=tf.SwinConfig(
                window_size=2,
                image_size=_IMAGE,
                embed_dim=8,
                depths=[1, 1, 1, 1],
                num_heads=[1, 1, 1, 1],
                out_indices=[2, 3, 4],
            ),
            use_timm_backbone=False,
            text_config=tf.CLIPTextConfig(
                vocab_size=50,
                hidden_size=16,
                intermediate_size=32,
                num_hidden_layers=1,
                num_attention_heads=2,
                max_position_embeddings=16,
                projection_dim=16,
                pad_token_id=0,
                bos_token_id=1,
                eos_token_id=2,
            ),
            encoder_in_channels=[16, 32, 64],
            text_projection_in_dim=16,
            text_projection_out_dim=16,
            class_embed_dim=16,
            task_encoder_hidden_dim=32,
            vision_features_channels=[32, 32, 32],
            encoder_hidden_dim=32,
            encoder_dim_feedforward=32,
            encoder_attention_heads=2,
            decoder_hidden_dim=32,
            decoder_dim_feedforward=32,
            decoder_num_heads=2,
            decoder_num_layers=3,
            decoder_num_points=2,
            num_queries=5,
            cache_size=4,
            apply_layernorm_after_vision_backbone=False,
        )
    if name == "yolos":
        return tf.YolosConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=32,
            image_size=[_IMAGE, _IMAGE],
            patch_size=16,
            num_detection_tokens=5,
            num_labels=_NUM_LABELS,
        )
    raise ValueError(f"unknown tiny DETR {name!r}; choose one of {TINY_HF_DETR_NAMES}")


def _text_inputs(generator: torch.Generator) -> dict[str, torch.Tensor]:
    # BERT [CLS] a . b . [SEP]: the grounding models read class phrases split by "." (1012).
    words = torch.randint(1000, 1100, (_BATCH, 2), generator=generator)
    dot, cls, sep = torch.full((_BATCH, 1), 1012), torch.full((_BATCH, 1), 101), torch.full((_BATCH, 1), 102)
    input_ids = torch.cat([cls, words[:, :1], dot, words[:, 1:], dot, sep], dim=1)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}


def _omdet_inputs(generator: torch.Generator) -> dict[str, torch.Tensor]:
    classes_per_image = 2
    n_classes = _BATCH * classes_per_image
    return {
        "classes_input_ids": torch.randint(1, 50, (n_classes, 4), generator=generator),
        "classes_attention_mask": torch.ones(n_classes, 4, dtype=torch.long),
        "tasks_input_ids": torch.randint(1, 50, (_BATCH, 6), generator=generator),
        "tasks_attention_mask": torch.ones(_BATCH, 6, dtype=torch.long),
        "classes_structure": torch.full((_BATCH,), classes_per_image, dtype=torch.long),
    }


def _labels(generator: torch.Generator, num_classes: int) -> list[dict[str, torch.Tensor]]:
    out = []
    for n in (2, 1):
        centres = 0.3 + 0.4 * torch.rand(n, 2, generator=generator)
        sizes = 0.1 + 0.3 * torch.rand(n, 2, generator=generator)
        out.append(
            {
                "class_labels": torch.randint(0, num_classes, (n,), generator=generator),
                "boxes": torch.cat([centres, sizes], dim=1),
            }
        )
    return out


#: Keys accepted by :func:`build_tiny_hf_detr`, with the transformers class each builds.
_CLASSES: dict[str, str] = {
    "detr": "DetrForObjectDetection",
    "conditional_detr": "ConditionalDetrForObjectDetection",
    "deformable_detr": "DeformableDetrForObjectDetection",
    "deformable_detr_two_stage": "DeformableDetrForObjectDetection",
    "dab_detr": "DabDetrForObjectDetection",
    "table_transformer": "TableTransformerForObjectDetection",
    "rt_detr": "RTDetrForObjectDetection",
    "rt_detr_v2": "RTDetrV2ForObjectDetection",
    "d_fine": "DFineForObjectDetection",
    "deimv2": "Deimv2ForObjectDetection",
    "pp_doclayout_v2": "PPDocLayoutV2ForObjectDetection",
    "pp_doclayout_v3": "PPDocLayoutV3ForObjectDetection",
    "pp_doclayout_v4": "PPDocLayoutV4ForObjectDetection",
    "lw_detr": "LwDetrForObjectDetection",
    "rf_detr": "RfDetrForObjectDetection",
    "grounding_dino": "GroundingDinoForObjectDetection",
    "mm_grounding_dino": "MMGroundingDinoForObjectDetection",
    "omdet_turbo": "OmDetTurboForObjectDetection",
    "yolos": "YolosForObjectDetection",
}

#: Names of the tiny detectors, one per DETR-family class (Deformable DETR twice: plain and
#: two-stage with box refinement).
TINY_HF_DETR_NAMES: tuple[str, ...] = tuple(_CLASSES)

_DOCLAYOUT = ("pp_doclayout_v2", "pp_doclayout_v3", "pp_doclayout_v4")
_NO_PIXEL_MASK = frozenset(
    {"rt_detr", "rt_detr_v2", "d_fine", "deimv2", "lw_detr", "rf_detr", "omdet_turbo", "yolos", *_DOCLAYOUT}
)
# transformers computes no loss for these: OmDet-Turbo takes no labels and the PP-DocLayout
# detectors raise "does not support training" when given labels.
_CANNOT_TRAIN = frozenset({"omdet_turbo", *_DOCLAYOUT})
_EXTRA_INPUTS: dict[str, Callable[[torch.Generator], dict[str, torch.Tensor]]] = {
    "grounding_dino": _text_inputs,
    "mm_grounding_dino": _text_inputs,
    "omdet_turbo": _omdet_inputs,
}


def _implementation_per_config(cls: type, name: str, attn_implementation: str) -> dict[str, str]:
    """``{"" or sub-config key: implementation}`` for the (sub-)models that support a choice.

    Parts whose transformers default is ``"eager"`` (CNN backbones, inline-softmax models)
    cannot dispatch to another implementation and keep ``"eager"``.
    """
    default = cls(_config(name)).config
    keys = {"": default} | {k: getattr(default, k) for k in default.sub_configs if getattr(default, k, None) is not None}
    return {k: attn_implementation if getattr(c, "_attn_implementation", None) == "sdpa" else "eager" for k, c in keys.items()}


def build_tiny_hf_detr(name: str, *, seed: int = 0, attn_implementation: str | None = None) -> TinyHFDetr:
    """Build one tiny DETR-family detector from a config (offline) with a matching batch.

    Args:
        name: one of :data:`TINY_HF_DETR_NAMES`.
        seed: seeds the weights (``torch.manual_seed``) and the batch.
        attn_implementation: ``"eager"``, ``"sdpa"`` or None (the transformers default, which is
            ``"sdpa"`` where a (sub-)model supports it). It is applied to the model and to every
            sub-model (backbone, text encoder) that supports a choice; the others stay ``"eager"``.

    Returns:
        A :class:`TinyHFDetr` whose model is in training mode.

    Raises:
        ValueError: for an unknown ``name``.
        ImportError: when ``transformers`` is not installed.

    Examples:
        >>> tiny = build_tiny_hf_detr("rt_detr", attn_implementation="eager")
        >>> tiny.model.config._attn_implementation
        'eager'
        >>> loss = tiny.forward(with_labels=True).loss
        >>> bool(torch.isfinite(loss))
        True
        >>> "grounding_dino" in TINY_HF_DETR_NAMES, build_tiny_hf_detr("omdet_turbo").labels is None
        (True, True)
    """
    if name not in _CLASSES:
        raise ValueError(f"unknown tiny DETR {name!r}; choose one of {TINY_HF_DETR_NAMES}")
    import transformers

    cls = getattr(transformers, _CLASSES[name])
    config = _config(name)
    if attn_implementation is not None:
        config._attn_implementation = _implementation_per_config(cls, name, attn_implementation)
    torch.manual_seed(seed)
    model = cls(config).train()
    generator = torch.Generator().manual_seed(seed)
    inputs: dict[str, torch.Tensor] = {
        "pixel_values": torch.randn(_BATCH, 3, _IMAGE, _IMAGE, generator=generator),
    }
    if name not in _NO_PIXEL_MASK:
        inputs["pixel_mask"] = torch.ones(_BATCH, _IMAGE, _IMAGE, dtype=torch.long)
    if name in _EXTRA_INPUTS:
        inputs.update(_EXTRA_INPUTS[name](generator))
    # The grounding models' classes are the phrases of the prompt (two per image here).
    num_classes = 2 if name in ("grounding_dino", "mm_grounding_dino") else _NUM_LABELS
    labels = None if name in _CANNOT_TRAIN else _labels(generator, num_classes)
    return TinyHFDetr(name=name, cls=cls, model=model, inputs=inputs, labels=labels)
