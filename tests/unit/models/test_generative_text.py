"""Text-only chat records in the generative family: a tiny Qwen3ForCausalLM whose processor is its tokenizer (load,
batches, response-only logits, students, generation), and text-only records in a VLM's batch."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen3ForCausalLM

from mmdistill.data.records import RecordError, read_records
from mmdistill.data.synth import generate_text_chat
from mmdistill.models import generative as gm
from mmdistill.models.tiny import build_tiny_lm, build_tiny_vlm, train_qwen_tokenizer

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def text_world(tmp_path_factory):
    out = tmp_path_factory.mktemp("text") / "data"
    summary = generate_text_chat(out, n=40, seed=2)
    records, _ = read_records(out / "chat_train.jsonl", "chat")
    tok = train_qwen_tokenizer([r.prompt for r in records] + [r.response for r in records])
    return out, summary, records, tok


@pytest.fixture(scope="module")
def lm(text_world, tmp_path_factory):
    _, _, records, tok = text_world
    folder = tmp_path_factory.mktemp("lm") / "model"
    build_tiny_lm(folder, [], preset="vlm-nano", tokenizer=tok, overrides={"num_hidden_layers": 2})
    model, proc = gm.load_vlm(str(folder))
    return folder, model.eval(), proc


def test_text_task_is_deterministic_and_answerable_from_the_prompt(text_world, tmp_path):
    out, summary, records, _ = text_world
    again = generate_text_chat(tmp_path / "again", n=40, seed=2)
    assert again == summary and (tmp_path / "again/chat_train.jsonl").read_text() == (out / "chat_train.jsonl").read_text()
    assert summary["chat"]["train"] == len(records) and summary["chat"]["test"] > 0
    for r in records:
        assert r.image_list == [] and r.prompt.startswith("Scene: ") and "\nQuestion: " in r.prompt
        assert r.skills != ["caption"]
        if r.skills == ["colour"]:  # the answer is in the scene text
            assert r.response in r.prompt.split("\nQuestion: ")[0]


def test_load_gives_the_causal_lm_and_its_tokenizer(lm):
    folder, model, proc = lm
    assert isinstance(model, Qwen3ForCausalLM) and type(proc).__name__ == "Qwen2Tokenizer"
    assert isinstance(AutoModelForCausalLM.from_pretrained(folder), Qwen3ForCausalLM)  # a plain transformers folder
    cfg = model.config.__class__(**{k: v for k, v in model.config.to_dict().items() if k != "architectures"})
    cfg.architectures = None
    assert gm._model_class(cfg).__name__ == "AutoModelForCausalLM"  # no architectures: the causal-LM auto class


def test_encode_chat_with_a_tokenizer_labels_only_the_response(lm, text_world):
    _, model, proc = lm
    _, _, records, _ = text_world
    recs = records[:4]
    batch = gm.encode_chat(proc, recs, [[] for _ in recs], max_length=256)
    assert "pixel_values" not in batch
    for i, r in enumerate(recs):
        ids = batch["response_ids"][i][batch["response_mask"][i]]
        assert proc.decode(ids) == r.response + "<|im_end|>"
        labelled = batch["labels"][i][batch["labels"][i] != -100]
        assert torch.equal(labelled, ids)
        pos = batch["response_positions"][i][batch["response_mask"][i]]
        assert torch.equal(batch["input_ids"][i][pos + 1], ids)  # each position predicts the next token
    # response-only logits equal the full forward's at those positions
    sig = gm.forward_signals(model, batch)
    with torch.no_grad():
        full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    want = torch.gather(full, 1, batch["response_positions"].unsqueeze(-1).expand(-1, -1, full.shape[-1]))
    assert torch.allclose(sig.logits, want, atol=1e-5)
    # errors stay one line naming the record
    with pytest.raises(RecordError, match="max_length=20 would cut the response") as e:
        gm.encode_chat(proc, recs[:1], [[]], max_length=20, path="t.jsonl")
    assert (e.value.path, e.value.line, e.value.field) == ("t.jsonl", recs[0].line, "response")


def test_text_only_records_in_a_vlm_batch(text_world, tmp_path):
    """A VLM takes text-only records too, also beside records with images in one batch."""
    from mmdistill.data.synth import generate

    _, _, text_records, tok = text_world
    generate(tmp_path / "img", n=10, seed=1, workers=1)
    img_records, _ = read_records(tmp_path / "img/chat_train.jsonl", "chat")
    model, proc = build_tiny_vlm(None, [], kind="qwen3_vl", preset="vlm-nano", tokenizer=tok)
    recs = [img_records[0], text_records[0]]
    batch = gm.encode_chat(proc, recs, [img_records[0].load_images(), []], max_length=256)
    assert int((batch["input_ids"][1] == model.config.image_token_id).sum()) == 0
    assert int((batch["input_ids"][0] == model.config.image_token_id).sum()) > 0
    sig = gm.forward_signals(model.eval(), batch)
    assert torch.isfinite(sig.logits).all() and sig.logits.shape[:2] == batch["response_ids"].shape
    assert proc.tokenizer.decode(batch["response_ids"][1][batch["response_mask"][1]]) == text_records[0].response + "<|im_end|>"


def test_students_of_a_text_teacher(lm, text_world):
    _, teacher, proc = lm
    _, _, records, _ = text_world
    batch = gm.encode_chat(proc, records[:2], [[], []], max_length=256)
    small = gm.scratch_student(teacher.config, {"num_hidden_layers": 1, "hidden_size": 64}, seed=3)
    assert isinstance(small, Qwen3ForCausalLM) and small.config.num_hidden_layers == 1 and gm.hidden_size(small) == 64
    gm.check_pairing(teacher, proc, small, proc)
    shallow = gm.inherit_student(teacher, {"text": [1]})
    assert shallow.config.num_hidden_layers == 1
    assert torch.equal(shallow.model.layers[0].mlp.up_proj.weight, teacher.model.layers[1].mlp.up_proj.weight)
    assert gm.forward_signals(shallow.eval(), batch).logits.shape == gm.forward_signals(teacher, batch).logits.shape


def test_generation_from_a_text_model(lm, text_world):
    from mmdistill.teachers.generate import LocalGenerator

    folder, _, _ = lm
    _, _, records, _ = text_world
    gen = LocalGenerator(str(folder), max_new_tokens=3, batch_size=4)
    text = gen.prompt_text(records[0].prompt, 0)
    assert text == f"<|im_start|>user\n{records[0].prompt}<|im_end|>\n<|im_start|>assistant\n"
    outs = gen(records[:3], [[], [], []])
    assert len(outs) == 3 and all(0 < o.n_tokens <= 3 for o in outs)
