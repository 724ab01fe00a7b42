"""The zoo's pretrained entries (registered on import of :mod:`qdetr.zoo`).

Released Q-DETR SMCA-DETR-R50 checkpoints (Hzbupahaozi/Q-DETR README; see
``docs/zoo.md``). Their SHA-256 and sizes were never published: the digest of the first
verified download is recorded in the cache metadata and enforced from then on. No float
SMCA teacher was released; float teachers and our own trained models are added here as
entries with an ``hf_hub_id`` once they are published.

Examples:
    >>> from qdetr.zoo.entries import QDETR_RELEASE_ENTRIES
    >>> [(entry.bits, entry.attn_bits, entry.box_ap) for entry in QDETR_RELEASE_ENTRIES]
    [(4, 8, 38.5), (2, 8, 32.4)]
    >>> from qdetr.zoo import list_pretrained
    >>> all(entry.name in list_pretrained() for entry in QDETR_RELEASE_ENTRIES)
    True
"""

from __future__ import annotations

from qdetr.zoo.registry import PretrainedEntry, register_pretrained

__all__ = ["QDETR_RELEASE_ENTRIES"]

_RELEASE_REPO = "https://github.com/Hzbupahaozi/Q-DETR"
_RELEASE_LICENSE = "unspecified (the Q-DETR release repository ships no licence file)"

#: The two released Q-DETR checkpoints (W-A-Attn 4-4-8 and 2-2-8, 50 epochs, COCO).
QDETR_RELEASE_ENTRIES = (
    PretrainedEntry(
        name="qdetr_smca_r50.w4a4attn8_seed_coco_e50",
        bits=4,
        attn_bits=8,
        profile="seed",
        gdrive_id="1K_lZckXWW9_mdSvhXELeWoSyqvFZVJAT",
        filename="ckpt_4_bit_smca_detr_coco.pth",
        box_ap=38.5,
        box_ap_source="Q-DETR release README (COCO val2017); not re-measured by qdetr",
        license=_RELEASE_LICENSE,
        epochs=50,
        teacher="SMCA-DETR-R50 real-valued, 41.0 AP (not released)",
        recipe=_RELEASE_REPO,
        description="Q-DETR SMCA-DETR-R50, 4-bit weights/activations, 8-bit attention (release checkpoint)",
    ),
    PretrainedEntry(
        name="qdetr_smca_r50.w2a2attn8_seed_coco_e50",
        bits=2,
        attn_bits=8,
        profile="seed",
        gdrive_id="1sJ12U0s-df8YYLbAiPMI24p8qSOXBTk_",
        filename="ckpt_2_bit_smca_detr_coco.pth",
        box_ap=32.4,
        box_ap_source="Q-DETR release README (COCO val2017); not re-measured by qdetr",
        license=_RELEASE_LICENSE,
        epochs=50,
        teacher="SMCA-DETR-R50 real-valued, 41.0 AP (not released)",
        recipe=_RELEASE_REPO,
        description="Q-DETR SMCA-DETR-R50, 2-bit weights/activations, 8-bit attention (release checkpoint)",
    ),
)

for _entry in QDETR_RELEASE_ENTRIES:
    register_pretrained(_entry)
