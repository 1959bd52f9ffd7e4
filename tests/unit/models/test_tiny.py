"""Tiny builders: the local tokenizer round-trips, special tokens never collide with ordinary ones,
and every architecture saves and reloads through the Auto classes with its real processor."""

import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoModelForSequenceClassification, AutoProcessor, AutoTokenizer

from mmdistill.models.tiny import QWEN_SPECIAL_TOKENS, VLM_KINDS, build_tiny_seq_cls, build_tiny_vlm, param_count, train_qwen_tokenizer

TEXTS = [f"What colour is the {s}? a {c} {s} at the top" for s in ("star", "circle", "square") for c in ("red", "blue")] * 3


@pytest.fixture(scope="module")
def tok():
    return train_qwen_tokenizer(TEXTS, vocab_size=300)


def test_tokenizer_round_trips_and_specials_are_distinct(tok):
    text = "<|im_start|>user\n<Query>: <|vision_start|><|image_pad|><|vision_end|>What colour is the star?<|im_end|>\n"
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text
    special = {tok.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    assert len(special) == len(QWEN_SPECIAL_TOKENS)
    ordinary = {i for t, i in tok.get_vocab().items() if t not in QWEN_SPECIAL_TOKENS}
    assert not special & ordinary
    assert len(tok.encode("yes", add_special_tokens=False)) == 1 and len(tok.encode("no", add_special_tokens=False)) == 1


@pytest.mark.parametrize("kind", VLM_KINDS)
def test_every_kind_saves_reloads_and_generates(tmp_path, tok, kind):
    model, proc = build_tiny_vlm(tmp_path, TEXTS, kind=kind, preset="vlm-nano", tokenizer=tok)
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path)
    proc2 = AutoProcessor.from_pretrained(tmp_path)
    assert type(loaded) is type(model)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the star?"}]}]
    text = proc2.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    enc = proc2(text=[text], images=[Image.new("RGB", (64, 64), (200, 20, 20))], return_tensors="pt")
    assert int((enc["input_ids"] == tok.convert_tokens_to_ids("<|image_pad|>")).sum()) == 4  # 64 px, patch 16, merge 2
    model.eval(), loaded.eval()
    with torch.no_grad():
        assert torch.allclose(model(**enc).logits, loaded(**enc).logits, atol=1e-5)


def test_presets_make_a_student_under_a_quarter_of_the_teacher(tok):
    teacher, _ = build_tiny_vlm(None, TEXTS, preset="vlm-teacher", tokenizer=tok)
    student, _ = build_tiny_vlm(None, TEXTS, preset="vlm-student", tokenizer=tok)
    assert param_count(student) <= 0.25 * param_count(teacher)


def test_seq_cls_builder(tmp_path, tok):
    build_tiny_seq_cls(tmp_path, TEXTS, preset="vlm-nano", tokenizer=tok)
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path)
    t = AutoTokenizer.from_pretrained(tmp_path)
    assert model(**t(["a red star"], return_tensors="pt")).logits.shape == (1, 1)
