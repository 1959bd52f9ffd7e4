"""Audio through the Qwen3-Omni thinker's own processor: chat batches with clips, the audio_pooled feature,
the audio feature-KD term counting only samples with a clip, and clear errors for models without an audio tower."""

import json
import wave

import numpy as np
import pytest
import torch

from mmdistill.data.records import RecordError, read_records
from mmdistill.losses.composite import FeatureDistillTerm
from mmdistill.models import generative as gm
from mmdistill.models.tiny import build_tiny_vlm, train_qwen_tokenizer
from mmdistill.signals import Signals

torch.set_num_threads(2)


def _wav(path, seconds, rate, freq):
    t = np.arange(int(seconds * rate)) / rate
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((0.4 * np.sin(2 * np.pi * freq * t) * 32767).astype("<i2").tobytes())


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("omni")
    from PIL import Image

    Image.new("RGB", (64, 64), (200, 30, 30)).save(d / "red.png")
    _wav(d / "short.wav", 0.7, 22050, 300.0)  # espeak-ng's rate: resampled to 16 kHz
    _wav(d / "long.wav", 2.3, 16000, 500.0)
    rows = [
        {"audio": "short.wav", "prompt": "Transcribe the audio.", "response": "a red circle"},
        {"image": "red.png", "audio": "long.wav", "prompt": "Answer the spoken question about the image.", "response": "red"},
        {"image": "red.png", "prompt": "Describe the image.", "response": "a large red square at the top"},
    ]
    (d / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    records, _ = read_records(d / "c.jsonl")
    tok = train_qwen_tokenizer([r["prompt"] + " " + r["response"] for r in rows] * 30, vocab_size=400)
    return d, records, tok


@pytest.fixture(scope="module")
def omni(data):
    _, _, tok = data
    model, proc = build_tiny_vlm(None, [], kind="qwen3_omni_thinker", preset="vlm-nano", tokenizer=tok)
    return model.eval(), proc


def test_encode_chat_places_each_clip_through_the_processor(data, omni):
    d, records, _ = data
    model, proc = omni
    batch = gm.encode_chat(proc, records, [r.load_images() for r in records], path="c.jsonl")
    assert batch["has_audio"].tolist() == [True, True, False] and batch["has_image"].tolist() == [False, True, True]
    # Whisper features of the two clips (16 kHz, 10 ms hop), padded to the longer one
    assert batch["input_features"].shape[:2] == (2, 128)
    assert batch["feature_attention_mask"].sum(1).tolist() == [70, 230]
    audio_id = model.config.audio_token_id
    n_audio = (batch["input_ids"] == audio_id).sum(1).tolist()
    assert n_audio[2] == 0 and n_audio[1] > n_audio[0] > 0  # the longer clip gets more audio tokens
    # the response tokens are where encode_chat says, whatever the audio expansion
    for i, rec in enumerate(records):
        ids = batch["response_ids"][i][batch["response_mask"][i]].tolist()
        assert proc.tokenizer.decode(ids[:-1]) == rec.response
    sig = gm.forward_signals(model, batch, features=("audio_pooled", "vision_pooled"))
    a = sig.features["audio_pooled"]
    assert a.shape == (3, gm.audio_feature_size(model))
    # audio_pooled is the mean of the audio tower's tokens per clip: recompute it from get_audio_features
    with torch.no_grad():
        tokens = model.model.get_audio_features(batch["input_features"], batch["feature_attention_mask"]).last_hidden_state
    split = torch.split(tokens, n_audio[:2])
    assert torch.allclose(a[0], split[0].mean(0), atol=1e-5) and torch.allclose(a[1], split[1].mean(0), atol=1e-5)
    assert a[2].abs().sum() == 0 and sig.features["vision_pooled"][0].abs().sum() == 0


def test_audio_feature_term_counts_only_samples_with_a_clip():
    term = FeatureDistillTerm("audio_pooled", 4, 4, sample_mask="has_audio")
    s = Signals(features={"audio_pooled": torch.tensor([[1.0, 1, 1, 1], [0, 0, 0, 0], [2, 2, 2, 2]])})
    t = Signals(features={"audio_pooled": torch.zeros(3, 4)})
    got = term(s, t, {"has_audio": torch.tensor([True, False, False])}, 0.0)
    assert torch.isclose(got, torch.tensor(1.0))
    assert term(s, t, {"has_audio": torch.tensor([False, False, False])}, 0.0) == 0  # never divides by zero
    assert torch.isclose(term(s, t, {}, 0.0), torch.tensor(5 / 3))  # no mask in the batch: every sample


def test_models_without_an_audio_tower_are_named(data):
    d, records, tok = data
    vl, vl_proc = build_tiny_vlm(None, [], kind="qwen3_vl", preset="vlm-nano", tokenizer=tok)
    with pytest.raises(RecordError) as e:
        gm.encode_chat(vl_proc, records, [r.load_images() for r in records], path="c.jsonl")
    assert str(e.value).startswith("c.jsonl:1: audio: the record carries audio but Qwen3VLProcessor takes none")
    assert not gm.has_audio_tower(vl)
    with pytest.raises(RecordError) as e:
        gm.check_audio(vl, "runs/vl/model", records, "c.jsonl")
    assert str(e.value).startswith("c.jsonl:1: audio: the data carries audio but the model 'runs/vl/model' (Qwen3VLForConditionalGeneration) has no audio tower")
    gm.check_audio(vl, "runs/vl/model", records[2:], "c.jsonl")  # image-only records are fine


def test_generation_hears_the_clip(data, omni, tmp_path):
    from mmdistill.teachers.generate import LocalGenerator, TeacherError

    d, records, tok = data
    model, proc = omni
    model.save_pretrained(tmp_path / "omni")
    proc.save_pretrained(tmp_path / "omni")
    gen = LocalGenerator(tmp_path / "omni", max_new_tokens=3, batch_size=3)
    enc = gen.encode(records, [r.load_images() for r in records])
    assert enc["input_features"].shape[0] == 2 and (enc["input_ids"] == model.config.audio_token_id).sum() > 0
    outs = gen(records, [r.load_images() for r in records])
    assert len(outs) == 3 and all(o.n_tokens >= 1 for o in outs)
    vl, vl_proc = build_tiny_vlm(tmp_path / "vl", [], kind="qwen3_vl", preset="vlm-nano", tokenizer=tok)
    with pytest.raises(TeacherError, match=r"the record carries audio but the model '.*vl' \(Qwen3VLForConditionalGeneration\) has no audio tower"):
        LocalGenerator(tmp_path / "vl", max_new_tokens=2)(records[:1], [[]])
