"""Write the example notebooks of ``examples/`` (stored without outputs).

The notebooks are generated from the cell lists below so that they stay easy to review and
to keep in step with the library. Run it after editing a cell::

    python examples/make_notebooks.py            # (re)write every notebook
    python examples/make_notebooks.py --check    # exit 1 if a stored notebook is out of date

``tests/test_notebooks.py`` executes every notebook (offline, CPU) and runs ``--check``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent

# Each notebook: a list of ("md" | "code", source). Sources are dedented by hand: keep them flush left.
NOTEBOOKS: dict[str, list[tuple[str, str]]] = {}

NOTEBOOKS["01_inference.ipynb"] = [
    ("md", """# 1. Inference: `from_pretrained` -> `predict` -> draw

Load a quantized detector, run it on an image and draw its detections.

Where the model comes from, in order:

1. the **model zoo**: `qdetr.from_pretrained("qdetr_smca_r50.w4a4attn8_seed_coco_e50")` downloads the
   released 4-bit Q-DETR SMCA-DETR-R50 checkpoint (COCO, 38.5 AP reported), verifies it, converts it and
   caches it in qdetr's packed format;
2. without network (or with `QDETR_OFFLINE=1`), the **4-bit model trained by `make demo`**
   (`outputs/demo/packed/w4a4_qdetr`), if you ran the demo;
3. otherwise a **tiny checkpoint in the release layout with random weights**, converted locally by the same
   code path as the zoo. Its boxes are meaningless: it shows the mechanics only.

The notebook prints which one it used."""),
    ("code", """import os
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw

import qdetr
from qdetr.data import SyntheticShapesConfig, render_synthetic_sample
from qdetr.zoo import DownloadError, OfflineModeError

ZOO_NAME = "qdetr_smca_r50.w4a4attn8_seed_coco_e50"
# The model `make demo` writes (run from the repository root); override with QDETR_DEMO_MODEL.
DEMO_MODEL = Path(os.environ.get("QDETR_DEMO_MODEL", "../outputs/demo/packed/w4a4_qdetr"))
OUT = Path("outputs/01_inference")
OUT.mkdir(parents=True, exist_ok=True)
_ = torch.manual_seed(0)"""),
    ("md", """## Load a model

`from_pretrained` accepts a zoo name, a directory written by `save_pretrained`, a release `.pth` file or a
Hugging Face Hub repo id, and always returns a model in eval mode with `predict`, `id2label`,
`save_pretrained` and `push_to_hub`."""),
    ("code", """def make_tiny_release_checkpoint(path: Path) -> Path:
    \"\"\"A test-sized checkpoint in the Q-DETR release layout (random but valid weights).\"\"\"
    from qdetr.models import model_config
    from qdetr.testing import make_release_state_dict

    state_dict = make_release_state_dict(config=model_config("qdetr_smca_tiny"), seed=0)
    torch.save({"model": state_dict}, path)  # the release files hold {"model": state_dict, ...}
    return path


def load_detector():
    \"\"\"Returns (model, source, threshold): zoo first, then `make demo`'s model, then a local conversion.\"\"\"
    try:
        return qdetr.from_pretrained(ZOO_NAME), f"model zoo ({ZOO_NAME})", 0.5
    except (OfflineModeError, DownloadError, OSError) as error:
        print(f"The model zoo is not reachable: {type(error).__name__}: {str(error)[:200]}")
    if (DEMO_MODEL / "config.json").is_file():
        print(f"Falling back to the model trained by `make demo`: {DEMO_MODEL}")
        return qdetr.from_pretrained(DEMO_MODEL), f"make demo ({DEMO_MODEL})", 0.5
    print("Falling back to a tiny release-layout checkpoint with RANDOM weights, converted locally "
          "(run `make demo` for a trained model).")
    path = make_tiny_release_checkpoint(OUT / "ckpt_4_bit_tiny_random.pth")  # `4_bit` in the name gives the width
    model = qdetr.from_pretrained(path, cache_dir=OUT / "cache")
    return model, f"local conversion of {path.name} (random weights)", 0.0


start = time.perf_counter()
model, source, threshold = load_detector()
print(f"model: {type(model).__name__} from {source}, loaded in {time.perf_counter() - start:.1f} s")
print(qdetr.quant_summary(model).coverage)"""),
    ("md", """## Predict

`model.predict(images, threshold)` takes PIL images, file paths, `(3, H, W)` tensors or `(H, W, 3)` arrays.
It resizes like DETR (short side 800, long side at most 1333), runs the model and returns, per image,
`scores` (N,), `labels` (N,) and `boxes` (N, 4) as **absolute xyxy pixels of the original image**, sorted by
score. Here the image is drawn by qdetr's synthetic data generator, so the notebook needs no download."""),
    ("code", """image = render_synthetic_sample(0, SyntheticShapesConfig(image_size=256), seed=0).image
image.save(OUT / "input.png")

detections = model.predict([image], threshold=threshold, top_k=100)[0]
keep = slice(0, 5)  # the five best
for score, label, box in zip(detections["scores"][keep], detections["labels"][keep], detections["boxes"][keep]):
    name = model.id2label.get(int(label), str(int(label)))
    print(f"{name:>12s}  {score:.2f}  xyxy = {[round(v, 1) for v in box.tolist()]}")"""),
    ("md", """## Draw"""),
    ("code", """def draw_detections(image: Image.Image, detections: dict, id2label: dict, limit: int = 5) -> Image.Image:
    canvas = image.convert("RGB").copy()
    draw = ImageDraw.Draw(canvas)
    for score, label, box in list(zip(detections["scores"], detections["labels"], detections["boxes"]))[:limit]:
        x0, y0, x1, y1 = box.tolist()
        draw.rectangle([x0, y0, x1, y1], outline=(255, 40, 40), width=2)
        draw.text((x0 + 3, y0 + 2), f"{id2label.get(int(label), int(label))} {score:.2f}", fill=(255, 255, 0))
    return canvas


picture = draw_detections(image, detections, model.id2label)
picture.save(OUT / "detections.png")
print(f"saved {OUT / 'detections.png'} ({source})")
picture"""),
]

NOTEBOOKS["02_quantize_and_distill.ipynb"] = [
    ("md", """# 2. Quantize and distill a DETR

The whole Q-DETR recipe on one screen, on qdetr's embedded synthetic shapes data set:

1. train a small **float** DETR (the teacher);
2. `quantize_model` a copy to 4 bits (weights and activations 4-bit, attention 8-bit, profile `"paper"`),
   add **distribution alignment** and **calibrate** the activation steps;
3. fine-tune it with the detection loss plus `DistillationLoss` (foreground-aware query matching against the
   frozen float teacher), and, for comparison, without distillation (plain LSQ QAT);
4. measure COCO box AP (pycocotools, through `qdetr.engine.evaluate_coco`) before and after.

Everything is sized to finish in well under a minute on a laptop CPU, so the models are tiny and barely
trained: the AP values show the mechanics, not the method's accuracy. `make demo` runs the same steps for a
few minutes and gives meaningful numbers."""),
    ("code", """import copy
import json
from pathlib import Path

import torch
from torch.utils.data import DataLoader

import qdetr
from qdetr.data import (
    CocoDetectionDataset,
    SyntheticShapesConfig,
    TransformConfig,
    collate_detection,
    make_eval_transforms,
    make_synthetic_coco,
    make_train_transforms,
)
from qdetr.distill import DistillationLoss, FrozenTeacher, insert_distribution_alignment
from qdetr.engine import evaluate_coco
from qdetr.models import build_criterion

OUT = Path("outputs/02_quantize_and_distill")
IMAGE_SIZE = 64         # pixels (the demo uses 128)
TRAIN_IMAGES, VAL_IMAGES = 96, 16
FLOAT_EPOCHS = 10       # float teacher
QAT_EPOCHS = 3          # each quantized run
BITS = 4
_ = torch.manual_seed(0)"""),
    ("md", """## Data

`make_synthetic_coco` writes a deterministic COCO-format data set (PNG images + `instances.json`);
`CocoDetectionDataset` reads any COCO-format folder, so the same code trains on your own data.
Targets follow DETR: `labels` are category ids and `boxes` are normalised cxcywh."""),
    ("code", """shapes = SyntheticShapesConfig(image_size=IMAGE_SIZE, max_objects=1, min_size_frac=0.35, max_size_frac=0.6,
                               num_classes_used=2)
train_ann = make_synthetic_coco(OUT / "data" / "train", TRAIN_IMAGES, config=shapes, seed=0)
val_ann = make_synthetic_coco(OUT / "data" / "val", VAL_IMAGES, config=shapes, seed=0, first_index=TRAIN_IMAGES)

sizes = TransformConfig(train_scales=(IMAGE_SIZE,), eval_size=IMAGE_SIZE, max_size=None, random_crop=False)
train_set = CocoDetectionDataset(OUT / "data" / "train" / "images", train_ann, make_train_transforms(sizes))
val_set = CocoDetectionDataset(OUT / "data" / "val" / "images", val_ann, make_eval_transforms(sizes))
train_loader = DataLoader(train_set, batch_size=8, shuffle=True, collate_fn=collate_detection,
                          generator=torch.Generator().manual_seed(0))
val_loader = DataLoader(val_set, batch_size=1, collate_fn=collate_detection)  # eval batch size 1: no padding

batch = next(iter(train_loader))
print("pixel_values", tuple(batch.pixel_values.shape), "pixel_mask", tuple(batch.pixel_mask.shape))
print("first target:", {k: v.tolist() for k, v in batch.targets[0].items()})
print("categories:", train_set.category_names, "-> num_classes =", train_set.num_classes)"""),
    ("md", """## A training loop with optional distillation

The detection loss is DETR's Hungarian set loss (`build_criterion`). With a teacher, the step adds
`loss_drd` from `DistillationLoss`: the student's decoder co-attention features (`co_attn_features`) of the
foreground queries are pulled towards those of the matched teacher queries. `loss_drd` is already multiplied
by the weight λ."""),
    ("code", """def train_one_epoch(model, criterion, optimizer, loader, *, teacher=None, distill=None):
    model.train()
    for batch in loader:
        outputs = model(batch.pixel_values, batch.pixel_mask)  # pred_logits (B, Q, C+1), pred_boxes (B, Q, 4), ...
        losses = criterion(outputs, batch.targets)
        loss = criterion.total_loss(losses)
        if distill is not None:
            terms = distill(outputs, teacher(batch.pixel_values, batch.pixel_mask), batch.targets)
            loss = loss + terms["loss_drd"]
            losses.update(terms)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        optimizer.step()
    logged = ("loss_ce", "loss_bbox", "loss_giou", "loss_drd", "frac_distilled")
    return {"loss": round(loss.item(), 3), **{k: round(float(losses[k].detach()), 3) for k in logged if k in losses}}


def box_ap(model):
    \"\"\"COCO AP@[.5:.95] and AP50 on the validation split (threshold 0, eval batch size 1).\"\"\"
    result = evaluate_coco(model, val_loader, val_set.coco)
    return {"AP": result.ap, "AP50": result.ap50}"""),
    ("md", """## 1. The float teacher

`detr_tiny` is a test-sized DETR (tiny ResNet, 1 encoder and 2 decoder layers). The DETR recipe freezes the
stem and `layer1` because it starts from ImageNet weights; this backbone starts from scratch, so everything
is trained."""),
    ("code", """float_model = qdetr.create_model("detr_tiny", num_classes=train_set.num_classes, hidden_dim=32,
                                 dim_feedforward=64, dropout=0.0, num_queries=5)
float_model.requires_grad_(True)
criterion = build_criterion(float_model.config)
optimizer = torch.optim.AdamW(float_model.parameters(), lr=2e-3, weight_decay=1e-4)
for epoch in range(FLOAT_EPOCHS):
    logs = train_one_epoch(float_model, criterion, optimizer, train_loader)
print("last epoch:", logs)
results = {"float": box_ap(float_model)}
print("float:", results["float"])"""),
    ("md", """## 2. Quantize, align, calibrate

`quantize_model` swaps every `Conv2d`, `Linear` and attention module for a quantization-aware one in place.
The `"paper"` profile keeps the first convolution at 8 bits, leaves `downsample`, `input_proj` and the heads
in float, and quantizes q, k, v and the softmax output of every attention to 8 bits per head.
`quant_summary` shows what happened to each layer, and why a layer stayed float.

`insert_distribution_alignment` puts the DA module on the decoder cross-attention query (the paper's
placement). `calibrate` initialises every activation step from one batch."""),
    ("code", """def quantized_copy(model):
    student = copy.deepcopy(model)
    qdetr.quantize_model(student, bits=BITS)           # W4/A4/attention 8, profile "paper"
    insert_distribution_alignment(student, where="cross")
    student.eval()                                      # no dropout while measuring ranges
    qdetr.calibrate(student, [batch], forward_fn=lambda m, b: m(b.pixel_values, b.pixel_mask))
    return student


student = quantized_copy(float_model)
summary = qdetr.quant_summary(student)
print("\\n".join(str(summary).splitlines()[:14]), "\\n...")
print("coverage (quantized, total):", summary.coverage)
results[f"{BITS}-bit, calibrated only"] = box_ap(student)
print(f"{BITS}-bit before fine-tuning:", results[f"{BITS}-bit, calibrated only"])"""),
    ("md", """## 3. Quantization-aware training, with and without distillation

`FrozenTeacher` keeps the float model in eval mode under `torch.no_grad()` and out of the student's
parameters. Both runs start from the same calibrated copy and train for the same number of epochs."""),
    ("code", """teacher = FrozenTeacher(float_model)
distill = DistillationLoss(tau=0.5, weight=1.0)

runs = {"LSQ (no distillation)": None, "Q-DETR (DA + distillation)": distill}
for name, loss_fn in runs.items():
    torch.manual_seed(0)
    model = quantized_copy(float_model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-4, weight_decay=1e-4)
    for epoch in range(QAT_EPOCHS):
        logs = train_one_epoch(model, criterion, optimizer, train_loader, teacher=teacher, distill=loss_fn)
    print(f"{name}: last epoch {logs}")
    results[f"{BITS}-bit {name}"] = box_ap(model)
    if loss_fn is not None:
        distilled_student = model"""),
    ("md", """## 4. AP before and after"""),
    ("code", """print(f"{'model':<40} {'AP':>6} {'AP50':>6}")
for name, ap in results.items():
    print(f"{name:<40} {100 * ap['AP']:6.1f} {100 * ap['AP50']:6.1f}")
(OUT / "results.json").write_text(json.dumps(results, indent=2))
print(f"\\nsaved {OUT / 'results.json'}; tiny models trained for seconds: run `make demo` for meaningful numbers")"""),
    ("md", """Next: `04_export_and_size.ipynb` saves such a model with its weights bit-packed
(`distilled_student` is a qdetr model, so `qdetr.save_pretrained(distilled_student, "my-w4")` works here too)."""),
]

#: The data cell of the Hugging Face notebooks (03, 05): synthetic shapes as COCO files, loaders and
#: the conversion of qdetr targets to transformers labels.
_HF_SYNTHETIC_DATA_CELL = """shapes = SyntheticShapesConfig(image_size=IMAGE_SIZE, max_objects=1, min_size_frac=0.35, max_size_frac=0.6,
                               num_classes_used=2)
train_ann = make_synthetic_coco(OUT / "data" / "train", TRAIN_IMAGES, config=shapes, seed=0)
val_ann = make_synthetic_coco(OUT / "data" / "val", VAL_IMAGES, config=shapes, seed=0, first_index=TRAIN_IMAGES)
sizes = TransformConfig(train_scales=(IMAGE_SIZE,), eval_size=IMAGE_SIZE, max_size=None, random_crop=False)
train_set = CocoDetectionDataset(OUT / "data" / "train" / "images", train_ann, make_train_transforms(sizes))
val_set = CocoDetectionDataset(OUT / "data" / "val" / "images", val_ann, make_eval_transforms(sizes))
train_loader = DataLoader(train_set, batch_size=8, shuffle=True, collate_fn=collate_detection,
                          generator=torch.Generator().manual_seed(0))
val_loader = DataLoader(val_set, batch_size=1, collate_fn=collate_detection)
calibration_batch = next(iter(train_loader))


def hf_labels(targets):
    \"\"\"qdetr targets -> Hugging Face labels (class ids and normalised cxcywh boxes).\"\"\"
    return [{"class_labels": t["labels"], "boxes": t["boxes"]} for t in targets]"""

NOTEBOOKS["03_huggingface_detr.ipynb"] = [
    ("md", """# 3. Quantize and distill a Hugging Face `DetrForObjectDetection`

The same recipe as notebook 2 on a transformers model. `quantize_model` reaches the Hugging Face DETR
attention (q/k/v/output projections, per-head 8-bit q, k, v and softmax), and `capture_co_attention` records
the decoder co-attention features that `DistillationLoss` needs, with hooks that are removed after each call.

The model is built from a small `DetrConfig` with a Hugging Face ResNet backbone and random initialisation,
so nothing is downloaded. With a real checkpoint you would write
`DetrForObjectDetection.from_pretrained("facebook/detr-resnet-50", revision="no_timm")` instead."""),
    ("code", """import copy
import json
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from transformers import DetrConfig, DetrForObjectDetection, ResNetConfig

import qdetr
from qdetr.data import (
    CocoDetectionDataset,
    SyntheticShapesConfig,
    TransformConfig,
    collate_detection,
    make_eval_transforms,
    make_synthetic_coco,
    make_train_transforms,
)
from qdetr.distill import DistillationLoss, FrozenTeacher, capture_co_attention, insert_distribution_alignment
from qdetr.engine import evaluate_coco
from qdetr.models import post_process_object_detection

OUT = Path("outputs/03_huggingface_detr")
IMAGE_SIZE = 64
TRAIN_IMAGES, VAL_IMAGES = 96, 16
FLOAT_EPOCHS = 6
QAT_EPOCHS = 2
BITS = 4
_ = torch.manual_seed(0)"""),
    ("md", """## Data (the embedded synthetic shapes)"""),
    ("code", _HF_SYNTHETIC_DATA_CELL),
    ("md", """## A small `DetrForObjectDetection`

`num_labels` is the number of class ids (largest category id + 1); the logits have one more column, the
"no object" class. `decoder_layerdrop` must be 0 for distillation: a dropped layer records no feature."""),
    ("code", """config = DetrConfig(
    use_timm_backbone=False,
    use_pretrained_backbone=False,
    backbone_config=ResNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], layer_type="basic",
                                 out_features=["stage2"]),
    d_model=32, encoder_layers=1, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
    encoder_ffn_dim=64, decoder_ffn_dim=64, num_queries=5, dropout=0.0, decoder_layerdrop=0.0,
    num_labels=train_set.num_classes,
)
float_model = DetrForObjectDetection(config)


def train_one_epoch(model, optimizer, loader, *, teacher=None, distill=None):
    model.train()
    for batch in loader:
        labels = hf_labels(batch.targets)
        if distill is None:
            out = model(pixel_values=batch.pixel_values, pixel_mask=batch.pixel_mask, labels=labels)
            loss, drd = out.loss, None
        else:
            with capture_co_attention(model) as capture:  # records co_attn_features (L, B, Q, d)
                out = model(pixel_values=batch.pixel_values, pixel_mask=batch.pixel_mask, labels=labels)
            teacher_out = teacher(pixel_values=batch.pixel_values, pixel_mask=batch.pixel_mask)
            drd = distill(capture.outputs(out), teacher_out, labels)["loss_drd"]
            loss = out.loss + drd
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        optimizer.step()
    return {"loss": round(loss.item(), 3), **({"loss_drd": round(drd.item(), 3)} if drd is not None else {})}


def hf_postprocess(outputs, threshold, target_sizes):
    \"\"\"Hugging Face outputs -> per-image scores, labels, absolute xyxy boxes (DETR softmax head).\"\"\"
    return post_process_object_detection({"pred_logits": outputs.logits, "pred_boxes": outputs.pred_boxes},
                                         threshold=threshold, target_sizes=target_sizes,
                                         classification="softmax")


def box_ap(model):
    result = evaluate_coco(model, val_loader, val_set.coco, postprocess=hf_postprocess)
    return {"AP": result.ap, "AP50": result.ap50}


optimizer = torch.optim.AdamW(float_model.parameters(), lr=2e-3, weight_decay=1e-4)
for epoch in range(FLOAT_EPOCHS):
    logs = train_one_epoch(float_model, optimizer, train_loader)
print("float, last epoch:", logs)
results = {"float": box_ap(float_model)}
print("float:", results["float"])"""),
    ("md", """## Quantize, align, calibrate

The attention modules stay Hugging Face modules: their projections become `QuantLinear` and the
attention itself runs through a registered fake-quant attention function. `quantize_model` also gives
them the `q_align` slot that `insert_distribution_alignment` fills."""),
    ("code", """def quantized_copy(model):
    student = copy.deepcopy(model)
    qdetr.quantize_model(student, bits=BITS)
    insert_distribution_alignment(student, where="cross")
    student.eval()
    qdetr.calibrate(student, [calibration_batch],
                    forward_fn=lambda m, b: m(pixel_values=b.pixel_values, pixel_mask=b.pixel_mask))
    return student


student = quantized_copy(float_model)
summary = qdetr.quant_summary(student)
print([row.name for row in summary.layers if row.kind == "attention"])
print("coverage (quantized, total):", summary.coverage)
results[f"{BITS}-bit, calibrated only"] = box_ap(student)
print(results[f"{BITS}-bit, calibrated only"])"""),
    ("md", """## Distill from the frozen float model

`FrozenTeacher` detects a transformers model and records its co-attention features with the same hooks."""),
    ("code", """teacher = FrozenTeacher(float_model)
distill = DistillationLoss(tau=0.5, weight=1.0)
optimizer = torch.optim.AdamW(student.parameters(), lr=2e-4, weight_decay=1e-4)
for epoch in range(QAT_EPOCHS):
    logs = train_one_epoch(student, optimizer, train_loader, teacher=teacher, distill=distill)
print("Q-DETR, last epoch:", logs)
results[f"{BITS}-bit Q-DETR (DA + distillation)"] = box_ap(student)

print(f"\\n{'model':<40} {'AP':>6} {'AP50':>6}")
for name, ap in results.items():
    print(f"{name:<40} {100 * ap['AP']:6.1f} {100 * ap['AP50']:6.1f}")
(OUT / "results.json").write_text(json.dumps(results, indent=2))
print(f"saved {OUT / 'results.json'}")"""),
]

NOTEBOOKS["04_export_and_size.ipynb"] = [
    ("md", """# 4. Export: packed low-bit files, their size, and loading them back bit-exactly

`save_pretrained` writes a directory with `config.json` (architecture + `QuantConfig`), `model.safetensors`
and a model card. Every quantized weight is stored as its **integer codes, bit-packed** (two 4-bit or four
2-bit codes per byte) plus its per-channel steps; float layers stay float32. `from_pretrained` rebuilds the
quantized model from `config.json` and reproduces its outputs bit-exactly.

This notebook uses a full-size **DETR-R50** (randomly initialised: size does not depend on training), at 4
and 2 bits. It takes well under a minute on a CPU."""),
    ("code", """import json
import time
from pathlib import Path

import torch
from safetensors import safe_open

import qdetr
from qdetr.testing import example_inputs

OUT = Path("outputs/04_export_and_size")
MODEL_NAME = "detr_r50"    # any name from qdetr.list_models(), e.g. "detr_tiny" for a quick look
BITS = (4, 2)
_ = torch.manual_seed(0)
pixel_values, pixel_mask = example_inputs(2, sizes_hw=[(96, 96), (80, 64)])  # a padded batch (B, 3, H, W), (B, H, W)"""),
    ("md", """## Float reference"""),
    ("code", """float_model = qdetr.create_model(MODEL_NAME).eval()
float_dir = qdetr.save_pretrained(float_model, OUT / "float")
num_params = sum(p.numel() for p in float_model.parameters())
print(f"{MODEL_NAME}: {num_params / 1e6:.1f} M parameters -> {float_dir}")
print(sorted(p.name for p in float_dir.iterdir()))"""),
    ("md", """## Quantize, calibrate, save packed, load back

Activation steps must be calibrated before saving: the file stores them, and an uncalibrated quantizer
refuses to run in eval mode."""),
    ("code", """def file_bytes_by_kind(path: Path) -> dict:
    \"\"\"Bytes of packed integer codes vs. float tensors in a model.safetensors file.\"\"\"
    sizes = {"packed codes": 0, "float tensors": 0}
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():
            tensor = f.get_tensor(key)
            kind = "packed codes" if key.endswith("packed_codes") else "float tensors"
            sizes[kind] += tensor.numel() * tensor.element_size()
    return sizes


rows = []
float_bytes = (float_dir / "model.safetensors").stat().st_size
rows.append(("float32", float_bytes, {"packed codes": 0, "float tensors": float_bytes}, None))
for bits in BITS:
    start = time.perf_counter()
    model = qdetr.create_model(MODEL_NAME)
    model.load_state_dict(float_model.state_dict())
    qdetr.quantize_model(model, bits=bits)          # profile "paper": W{bits}/A{bits}/attention 8
    qdetr.calibrate(model, [(pixel_values, pixel_mask)])
    model.eval()
    with torch.no_grad():
        reference = model(pixel_values, pixel_mask)

    saved = qdetr.save_pretrained(model, OUT / f"w{bits}")
    loaded = qdetr.from_pretrained(saved)
    with torch.no_grad():
        again = loaded(pixel_values, pixel_mask)
    exact = all(torch.equal(reference[k], again[k]) for k in ("pred_logits", "pred_boxes"))
    weights = saved / "model.safetensors"
    rows.append((f"W{bits}A{bits}, attention 8", weights.stat().st_size, file_bytes_by_kind(weights), exact))
    print(f"{bits}-bit: saved, reloaded, bit-exact outputs: {exact} ({time.perf_counter() - start:.1f} s)")
    assert exact, "the reloaded model must reproduce the saved one exactly"
"""),
    ("md", """## Size table"""),
    ("code", """lines = [
    "| model | model.safetensors | vs float32 | packed codes | float tensors | reload bit-exact |",
    "| --- | ---: | ---: | ---: | ---: | :---: |",
]
for name, size, parts, exact in rows:
    lines.append(f"| {name} | {size / 1e6:.1f} MB | {size / float_bytes:.3f}x | {parts['packed codes'] / 1e6:.1f} MB | "
                 f"{parts['float tensors'] / 1e6:.1f} MB | {'-' if exact is None else exact} |")
table = "\\n".join(lines)
print(table)
(OUT / "size_table.md").write_text(table + "\\n")"""),
    ("md", """The float tensors (ResNet `downsample` convolutions, `input_proj`, heads, query embeddings, norms,
biases and the per-channel steps) are not quantized by the profile, so they set a floor on the file
size: at 2 bits they are most of the file. Inference still runs fake-quantized in floating point: the
file shrinks, the model does not get faster without integer kernels.

## What is in the directory"""),
    ("code", """config = json.loads((OUT / f"w{BITS[0]}" / "config.json").read_text())
print("quantization:", json.dumps(config["quantization"], indent=1)[:400], "...")
print("\\nmodel card:\\n" + "\\n".join((OUT / f"w{BITS[0]}" / "README.md").read_text().splitlines()[:12]))"""),
]


NOTEBOOKS["05_rt_detr_family.ipynb"] = [
    ("md", """# 5. Any DETR: a 4-bit RT-DETR trained with Q-DETR distillation

The recipe of notebooks 2 and 3 on a Hugging Face `RTDetrForObjectDetection`, a DETR with a hybrid CNN
encoder and a **deformable** decoder cross-attention. The same calls work for every DETR-family class of
transformers (see the *Hugging Face DETR family coverage* page of the docs). What this model adds, and how
`qdetr` handles it:

* **deformable cross-attention**: `quantize_model` quantizes its value / offset / weight / output
  projections and its 8-bit data path; the co-attended feature that is distilled is the sampled values
  weighted by the attention weights, i.e. the input of `output_proj`;
* **denoising queries** in training: `capture.outputs(...)` drops them, only the matching queries are
  distilled;
* **two-stage query selection**: student and teacher pick different top-k proposals, so
  foreground-aware query matching pairs them by their boxes;
* **distribution alignment** goes into the decoder *self*-attention query (deformable attention has no
  query-key product).

The model is built from a tiny `RTDetrConfig` with random weights, so nothing is downloaded. With network
access, start from a published checkpoint instead, e.g.
`RTDetrForObjectDetection.from_pretrained("PekingU/rtdetr_r18vd", num_labels=..., ignore_mismatched_sizes=True)`
(fine-tune the float model on your classes first; it is then the teacher and the start of the student)."""),
    ("code", """import copy
import json
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from transformers import RTDetrConfig, RTDetrForObjectDetection, RTDetrResNetConfig

import qdetr
from qdetr.data import (
    CocoDetectionDataset,
    SyntheticShapesConfig,
    TransformConfig,
    collate_detection,
    make_eval_transforms,
    make_synthetic_coco,
    make_train_transforms,
)
from qdetr.distill import DistillationLoss, FrozenTeacher, capture_co_attention, insert_distribution_alignment
from qdetr.engine import evaluate_coco
from qdetr.models import post_process_object_detection

OUT = Path("outputs/05_rt_detr_family")
IMAGE_SIZE = 64
TRAIN_IMAGES, VAL_IMAGES = 64, 16
FLOAT_EPOCHS = 6
QAT_EPOCHS = 2
BITS = 4
_ = torch.manual_seed(0)"""),
    ("md", """## Data (the embedded synthetic shapes)"""),
    ("code", _HF_SYNTHETIC_DATA_CELL),
    ("md", """## A small `RTDetrForObjectDetection`

A ResNet backbone with three output stages feeds the hybrid encoder; the decoder has 3 layers, 5 queries
and 4 denoising queries per group (these are the settings of `qdetr.tiny_hf_detr.build_tiny_hf_detr("rt_detr")`).
RT-DETR scores classes with sigmoids: there is no "no object" column."""),
    ("code", """config = RTDetrConfig(
    backbone_config=RTDetrResNetConfig(embedding_size=16, hidden_sizes=[16, 16, 32, 32], depths=[1, 1, 1, 1],
                                       layer_type="basic", out_features=["stage2", "stage3", "stage4"]),
    use_timm_backbone=False, use_pretrained_backbone=False,
    d_model=32, encoder_hidden_dim=32, encoder_in_channels=[16, 32, 32], feat_strides=[8, 16, 32],
    encoder_layers=1, encoder_ffn_dim=32, encoder_attention_heads=2, decoder_in_channels=[32, 32, 32],
    num_feature_levels=3, decoder_layers=3, decoder_ffn_dim=32, decoder_attention_heads=2, decoder_n_points=2,
    num_queries=5, num_denoising=4, num_labels=train_set.num_classes,
)
float_model = RTDetrForObjectDetection(config)


def train_one_epoch(model, optimizer, loader, *, teacher=None, distill=None):
    model.train()
    for batch in loader:
        labels = hf_labels(batch.targets)
        if distill is None:
            out = model(pixel_values=batch.pixel_values, labels=labels)
            loss, drd = out.loss, None
        else:
            with capture_co_attention(model) as capture:  # co_attn_features (L, B, Q, d), denoising dropped
                out = model(pixel_values=batch.pixel_values, labels=labels)
            teacher_out = teacher(pixel_values=batch.pixel_values)  # eval, no labels: no denoising queries
            drd = distill(capture.outputs(out), teacher_out, labels)["loss_drd"]
            loss = out.loss + drd
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        optimizer.step()
    return {"loss": round(loss.item(), 3), **({"loss_drd": round(drd.item(), 3)} if drd is not None else {})}


def hf_postprocess(outputs, threshold, target_sizes):
    \"\"\"Hugging Face outputs -> per-image scores, labels, absolute xyxy boxes (sigmoid head).\"\"\"
    return post_process_object_detection({"pred_logits": outputs.logits, "pred_boxes": outputs.pred_boxes},
                                         threshold=threshold, target_sizes=target_sizes,
                                         classification="sigmoid")


def box_ap(model):
    result = evaluate_coco(model, val_loader, val_set.coco, postprocess=hf_postprocess)
    return {"AP": result.ap, "AP50": result.ap50}


optimizer = torch.optim.AdamW(float_model.parameters(), lr=2e-3, weight_decay=1e-4)
for epoch in range(FLOAT_EPOCHS):
    logs = train_one_epoch(float_model, optimizer, train_loader)
print("float, last epoch:", logs)
results = {"float": box_ap(float_model)}
print("float:", results["float"])"""),
    ("md", """## Quantize, align, calibrate

`quantize_model` reaches the convolutional hybrid encoder, its softmax self-attention (AIFI), the decoder
self-attention and the deformable cross-attention; prediction heads and the coordinate paths stay in
float (the summary says why). Distribution alignment goes into the decoder self-attention query."""),
    ("code", """def quantized_copy(model):
    student = copy.deepcopy(model)
    qdetr.quantize_model(student, bits=BITS)
    print("distribution alignment in:", insert_distribution_alignment(student, where="self"))
    student.eval()
    qdetr.calibrate(student, [calibration_batch], forward_fn=lambda m, b: m(pixel_values=b.pixel_values))
    return student


student = quantized_copy(float_model)
summary = qdetr.quant_summary(student)
print("coverage (quantized, total):", summary.coverage)
print("deformable cross-attention:", [row.name for row in summary.layers if row.name.endswith("encoder_attn")])
print("kept in float:", sorted({status for status in summary.float_layers.values()}))
results[f"{BITS}-bit, calibrated only"] = box_ap(student)
print(results[f"{BITS}-bit, calibrated only"])"""),
    ("md", """## What the capture sees in training

In training RT-DETR prepends denoising queries to the decoder. The capture records every query; its
`outputs` keep the matching ones, the same queries the eval-mode teacher has."""),
    ("code", """teacher = FrozenTeacher(float_model)
batch = calibration_batch
student.train()
with capture_co_attention(student) as capture:
    out = student(pixel_values=batch.pixel_values, labels=hf_labels(batch.targets))
print("dn_num_split (denoising, matching):", out.denoising_meta_values["dn_num_split"])
print("captured (L, B, Q_all, d):", tuple(capture.features.shape))
print("distilled (L, B, Q, d):   ", tuple(capture.outputs(out)["co_attn_features"].shape))
print("teacher (L, B, Q, d):     ", tuple(teacher(pixel_values=batch.pixel_values)["co_attn_features"].shape))"""),
    ("md", """## Distill from the frozen float model"""),
    ("code", """distill = DistillationLoss(tau=0.5, weight=1.0)
optimizer = torch.optim.AdamW(student.parameters(), lr=2e-4, weight_decay=1e-4)
for epoch in range(QAT_EPOCHS):
    logs = train_one_epoch(student, optimizer, train_loader, teacher=teacher, distill=distill)
print("Q-DETR, last epoch:", logs)
results[f"{BITS}-bit Q-DETR (DA + distillation)"] = box_ap(student)

print(f"\\n{'model':<40} {'AP':>6} {'AP50':>6}")
for name, ap in results.items():
    print(f"{name:<40} {100 * ap['AP']:6.1f} {100 * ap['AP50']:6.1f}")
(OUT / "results.json").write_text(json.dumps(results, indent=2))
print(f"saved {OUT / 'results.json'}")"""),
]

def build(name: str) -> nbformat.NotebookNode:
    """The notebook ``name`` from its cell list (no outputs, no execution counts)."""
    cells = []
    for kind, source in NOTEBOOKS[name]:
        cells.append(new_markdown_cell(source) if kind == "md" else new_code_cell(source))
    nb = new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    # Stable ids keep the stored files identical from one generation to the next.
    for index, cell in enumerate(nb.cells):
        cell["id"] = f"{Path(name).stem.split('_')[0]}-{index:02d}"
    return nb


def render(name: str) -> str:
    """The notebook ``name`` as the JSON text that is stored in ``examples/``."""
    return nbformat.writes(build(name)) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check that the stored notebooks are up to date")
    parser.add_argument("--out-dir", type=Path, default=HERE, help="where to write (default: examples/)")
    args = parser.parse_args(argv)
    stale = []
    for name in NOTEBOOKS:
        path = args.out_dir / name
        text = render(name)
        if args.check:
            if not path.is_file() or path.read_text(encoding="utf-8") != text:
                stale.append(name)
        else:
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path}")
    if stale:
        print(f"out of date: {', '.join(stale)}; run python examples/make_notebooks.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
