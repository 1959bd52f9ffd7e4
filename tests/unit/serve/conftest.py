"""Tiny served models (built locally, real architectures) shared by the serve tests."""

import base64
import io

import pytest
from PIL import Image

from mmdistill.models import reranker as rm
from mmdistill.models.tiny import train_qwen_tokenizer

TEXTS = [f"a {s} {c} {k} at the {p}" for s in ("small", "large") for c in ("red", "blue", "green") for k in ("circle", "square") for p in ("top", "left")]
TEXTS += [rm.SYSTEM_PROMPT, "<Instruct>: <Query>: <Document>: yes no", "Given a caption, find the matching image.", "what shape is it? a circle"]


def data_url(img: Image.Image, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="session")
def qwen_tok():
    return train_qwen_tokenizer(TEXTS, vocab_size=400)


@pytest.fixture(scope="session")
def folders(tmp_path_factory, qwen_tok):
    """Model folders: clip, seq_cls, yesno (a Qwen3-VL reranker), chat (a Qwen3-VL VLM), and the seq_cls ONNX export."""
    from mmdistill.export.onnx import export_onnx
    from mmdistill.models.contrastive import build_tiny_clip
    from mmdistill.models.tiny import build_tiny_vlm

    d = tmp_path_factory.mktemp("served")
    build_tiny_clip(d / "clip", TEXTS, preset="clip-nano", image_size=32, patch_size=8)
    rm.build_tiny_reranker(d / "seq_cls", TEXTS, kind="seq_cls", preset="vlm-nano", tokenizer=qwen_tok, seed=1)
    rm.build_tiny_reranker(d / "yesno", TEXTS, kind="yesno", preset="vlm-nano", tokenizer=qwen_tok, seed=2)
    build_tiny_vlm(d / "chat", TEXTS, preset="vlm-nano", tokenizer=qwen_tok, seed=3)
    export_onnx(d / "seq_cls", d / "seq_cls_onnx", log=lambda *_: None)
    return d
