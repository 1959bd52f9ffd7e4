"""Zero-shot accuracy over the user's class names: top-1 / top-5 against torchmetrics, the confusion matrix, and the
labels-file / meta.label checks."""

import pytest
import torch
from PIL import Image
from torchmetrics.classification import MulticlassAccuracy

from mmdistill.data.records import RecordError, read_records
from mmdistill.evaluate import contrastive as ec
from mmdistill.models import contrastive as cm

LABELS = ["zero", "one", "two", "three", "four", "five", "six"]


def test_top1_top5_and_confusion_match_torchmetrics():
    model, proc = cm.build_tiny_clip(None, [f"a photo of a {w}." for w in LABELS] * 3, preset="clip-nano", image_size=32, patch_size=8)
    model.eval()
    g = torch.Generator().manual_seed(0)
    images = [Image.fromarray((torch.rand(32, 32, 3, generator=g) * 255).to(torch.uint8).numpy()) for _ in range(40)]
    targets = torch.randint(0, len(LABELS), (40,), generator=g).tolist()
    metrics, confusion = ec.zero_shot_labels(model, proc, images, targets, LABELS, ["a photo of a {label}.", "a {label}"])
    # reference: class embedding = mean of the two normalised prompt embeddings, logits = cosine similarities
    with torch.no_grad():
        enc = cm.preprocess_texts(proc, [t.format(label=c) for c in LABELS for t in ("a photo of a {label}.", "a {label}")])
        txt = torch.nn.functional.normalize(cm.encode_texts(model, enc["input_ids"], enc["attention_mask"]), dim=-1).view(len(LABELS), 2, -1).mean(1)
        img = cm.encode_images(model, cm.preprocess_images(proc, images))
    logits = torch.nn.functional.normalize(img, dim=-1) @ torch.nn.functional.normalize(txt, dim=-1).T
    y = torch.tensor(targets)
    for k in (1, 5):
        ref = MulticlassAccuracy(num_classes=len(LABELS), top_k=k, average="micro")(logits, y).item() * 100
        assert metrics[f"zeroshot_top{k}"] == pytest.approx(ref, abs=1e-4)
    pred = logits.argmax(-1)
    for i in range(len(LABELS)):
        for j in range(len(LABELS)):
            assert confusion[i][j] == int(((y == i) & (pred == j)).sum())


def test_labels_file_checks(tmp_path):
    p = tmp_path / "labels.txt"
    p.write_text("cat\ndog\n\n")  # trailing blank lines are the end of the file, not labels
    assert ec.read_labels(p) == ["cat", "dog"]
    p.write_text("cat\n\ndog\n")
    with pytest.raises(RecordError, match=r"labels.txt:2: label: empty line"):
        ec.read_labels(p)
    p.write_text("cat\ndog\ncat\n")
    with pytest.raises(RecordError, match=r"labels.txt:3: label: 'cat' repeats line 1"):
        ec.read_labels(p)
    p.write_text("\n")
    with pytest.raises(RecordError, match="no labels"):
        ec.read_labels(p)
    with pytest.raises(FileNotFoundError, match="labels file not found"):
        ec.read_labels(tmp_path / "nope.txt")


def test_record_labels_name_the_line(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    data = tmp_path / "val.jsonl"
    data.write_text('{"image": "a.png", "text": "x", "meta": {"label": "dog"}}\n{"image": "a.png", "text": "y", "meta": {"label": "cow"}}\n{"image": "a.png", "text": "z"}\n')
    records, _ = read_records(data, "pair", on_error="fail")
    assert ec.record_labels(records[:1], ["cat", "dog"], data) == [1]
    with pytest.raises(RecordError, match=r"val.jsonl:2: meta.label: 'cow' is not in the labels file"):
        ec.record_labels(records, ["cat", "dog"], data)
    with pytest.raises(RecordError, match=r"val.jsonl:3: meta.label: missing"):
        ec.record_labels(records[2:], ["cat", "dog"], data)
