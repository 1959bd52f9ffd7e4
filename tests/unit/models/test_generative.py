"""Image-text-to-text adapter on tiny real Qwen-VL models: chat batches, response-only logits, students."""

import pytest
import torch
from transformers import AutoModelForImageTextToText

from helpers import chat_tokenizer
from mmdistill.data.records import ChatRecord, RecordError, parse_record, read_records
from mmdistill.data.synth import generate
from mmdistill.models import generative as gm
from mmdistill.models.contrastive import PairingError
from mmdistill.models.tiny import VLM_KINDS, build_tiny_vlm, make_processor, param_count, train_qwen_tokenizer

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes") / "world"
    generate(out, n=60, seed=1, workers=1)
    records, _ = read_records(out / "chat_train.jsonl", "chat")
    return out, records


@pytest.fixture(scope="module")
def tok(world):
    out, _ = world
    return chat_tokenizer(out, limit=200)[1]


@pytest.fixture(scope="module")
def sample(world):
    """Four records with responses of different lengths (the caption is the longest)."""
    _, records = world
    recs = records[:4]
    return recs, [r.load_images() for r in recs]


@pytest.fixture(scope="module")
def nano(tok):
    """One tiny model of each kind, built once."""
    out = {}
    for kind in VLM_KINDS:
        model, proc = build_tiny_vlm(None, [], kind=kind, preset="vlm-nano", tokenizer=tok)
        out[kind] = (model.eval(), proc)
    return out


@pytest.fixture(scope="module")
def pair(tok):
    """A Qwen3-VL teacher (2 vision blocks, 128-px images -> 16 image tokens) and a student (64 px -> 4)."""
    teacher, _ = build_tiny_vlm(None, [], kind="qwen3_vl", preset="vlm-teacher", tokenizer=tok, seed=1)
    t_proc = make_processor("qwen3_vl", tok, image_size=128)
    student, s_proc = build_tiny_vlm(None, [], kind="qwen3_vl", preset="vlm-student", tokenizer=tok, seed=2)
    return teacher.eval(), t_proc, student.eval(), s_proc


def _gathered(logits, positions):
    return torch.gather(logits, 1, positions.unsqueeze(-1).expand(-1, -1, logits.shape[-1]))


def _chat(**fields):
    obj = {"image": "images/train/000000.png", "prompt": "What shape is at the top?", **fields}
    return parse_record(obj, "chat", line=7)


# ---------------------------------------------------------------------------------------------
# encode_chat


def test_encode_chat_labels_positions_and_padding(nano, sample):
    model, proc = nano["qwen3_vl"]
    recs, imgs = sample
    b = gm.encode_chat(proc, recs, imgs)
    tok = proc.tokenizer
    B, T = b["input_ids"].shape
    lens = [len(tok(r.response)["input_ids"]) + 1 for r in recs]  # + <|im_end|>
    R = max(lens)
    assert b["response_ids"].shape == b["response_positions"].shape == b["response_mask"].shape == (B, R)
    assert b["response_ids"].dtype == b["response_positions"].dtype == torch.long and b["response_mask"].dtype == torch.bool
    assert b["response_mask"].sum(1).tolist() == lens
    for i, r in enumerate(recs):
        m = b["response_mask"][i]
        assert tok.decode(b["response_ids"][i][m]) == r.response + "<|im_end|>"
        # the position whose logits predict each response token is its index - 1
        pos = b["response_positions"][i][m]
        assert torch.equal(b["input_ids"][i, pos + 1], b["response_ids"][i][m])
        assert torch.equal(b["labels"][i, pos + 1], b["response_ids"][i][m])
        assert int((b["labels"][i] != -100).sum()) == lens[i]
        # padding: right side, zeros in the response tensors
        am = b["attention_mask"][i]
        n = int(am.sum())
        assert am[:n].all() and not am[n:].any()
        assert not b["response_ids"][i][~m].any() and not b["response_positions"][i][~m].any()
    # the model's own inputs come along; mm_token_type_ids marks the 4 image tokens per 64-px image
    assert {"pixel_values", "image_grid_thw", "mm_token_type_ids"} <= set(b)
    assert b["mm_token_type_ids"].eq(1).sum(1).tolist() == [4] * B


def test_teacher_and_student_align_despite_image_token_counts(pair, sample):
    _, t_proc, _, s_proc = pair
    recs, imgs = sample
    tb = gm.encode_chat(t_proc, recs, imgs)
    sb = gm.encode_chat(s_proc, recs, imgs)
    image_id = t_proc.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert (tb["input_ids"] == image_id).sum(1).tolist() == [16] * len(recs)
    assert (sb["input_ids"] == image_id).sum(1).tolist() == [4] * len(recs)
    assert tb["input_ids"].shape[1] == sb["input_ids"].shape[1] + 12
    assert torch.equal(tb["response_ids"], sb["response_ids"])
    assert torch.equal(tb["response_mask"], sb["response_mask"])
    m = sb["response_mask"]
    assert torch.equal(tb["response_positions"][m], sb["response_positions"][m] + 12)


def test_encode_chat_max_length(nano, sample):
    _, proc = nano["qwen3_vl"]
    recs, imgs = sample
    full = gm.encode_chat(proc, recs, imgs)
    n = int(full["attention_mask"][0].sum())
    last_label = int(full["response_positions"][0].max()) + 2  # tokens up to and including <|im_end|>
    ok = gm.encode_chat(proc, recs[:1], imgs[:1], max_length=last_label)
    assert ok["input_ids"].shape[1] == last_label < n  # only the template's trailing newline is cut
    assert torch.equal(ok["response_ids"], full["response_ids"][:1, : ok["response_ids"].shape[1]])
    with pytest.raises(RecordError, match="max_length=") as e:
        gm.encode_chat(proc, recs[:1], imgs[:1], max_length=last_label - 1, path="train.jsonl")
    assert e.value.field == "response" and e.value.line == recs[0].line and str(e.value).startswith("train.jsonl:")


def test_encode_chat_record_errors(nano, sample, world):
    _, proc = nano["qwen3_vl"]
    out, _ = world
    _, imgs = sample
    rec = _chat(response="star")
    rec._base_dir = out
    with pytest.raises(RecordError, match="missing") as e:
        gm.encode_chat(proc, [rec], [imgs[0]], response_field="teacher_response", path="d.jsonl")
    assert (e.value.path, e.value.line, e.value.field) == ("d.jsonl", 7, "teacher_response")
    empty = ChatRecord.model_construct(image="images/train/000000.png", prompt="What shape?", response="")
    with pytest.raises(RecordError, match="empty") as e:
        gm.encode_chat(proc, [empty], [imgs[0]])
    assert e.value.field == "response"
    with pytest.raises(RecordError, match="0 were loaded") as e:
        gm.encode_chat(proc, [rec], [[]])
    assert e.value.field == "image" and e.value.line == 7
    with pytest.raises(RecordError, match="2 were loaded") as e:
        gm.encode_chat(proc, [rec], [imgs[0] * 2])
    assert e.value.field == "image"
    sneaky = _chat(prompt="Look: <|image_pad|> what is it?", response="star")
    with pytest.raises(RecordError, match="places 2 image placeholder") as e:
        gm.encode_chat(proc, [sneaky], [imgs[0]])
    assert e.value.field == "image"
    multi = parse_record({"images": ["a.png", "b.png"], "prompt": "Same?", "response": "no"}, "chat", line=3)
    with pytest.raises(RecordError) as e:
        gm.encode_chat(proc, [multi], [imgs[0]])
    assert e.value.field == "images"


# ---------------------------------------------------------------------------------------------
# forward_signals / response_ce, every kind


@pytest.mark.parametrize("kind", VLM_KINDS)
def test_forward_signals_match_full_forward(kind, nano, sample):
    model, proc = nano[kind]
    recs, imgs = sample
    b = gm.encode_chat(proc, recs, imgs)
    inputs = gm.model_inputs(model, b)
    if kind == "qwen3_omni_thinker":
        assert "mm_token_type_ids" not in b  # its processor does not make it (and generate() rejects it)
    else:
        assert "mm_token_type_ids" in inputs  # Qwen-VL's forward needs it for the multimodal rope
    with torch.no_grad():
        sig = gm.forward_signals(model, b, features=("text_hidden", "vision_pooled"))
        full = model(**inputs, labels=b["labels"], output_hidden_states=True)
    B, R = b["response_ids"].shape
    V = model.lm_head.out_features
    assert sig.logits.shape == (B, R, V) and torch.equal(sig.mask, b["response_mask"])
    m = sig.mask
    assert torch.allclose(sig.logits[m], _gathered(full.logits, b["response_positions"])[m], atol=1e-5)
    assert torch.allclose(gm.response_ce(sig, b), full.loss, atol=1e-5)
    assert sig.features["text_hidden"].shape == (B, R, gm.hidden_size(model))
    ref_hidden = _gathered(full.hidden_states[-2], b["response_positions"])
    assert torch.allclose(sig.features["text_hidden"][m], ref_hidden[m], atol=1e-5)
    assert sig.features["vision_pooled"].shape == (B, gm.vision_feature_size(model))
    with torch.no_grad():
        enc = model.model.get_image_features(b["pixel_values"], b["image_grid_thw"], return_dict=True)
    per_image = [t.mean(0) for t in enc.pooler_output]  # one image per sample here
    assert torch.allclose(sig.features["vision_pooled"], torch.stack(per_image), atol=1e-5)


def test_features_only_when_asked_and_unknown_refused(nano, sample):
    model, proc = nano["qwen3_vl"]
    recs, imgs = sample
    b = gm.encode_chat(proc, recs[:2], imgs[:2])
    with torch.no_grad():
        assert gm.forward_signals(model, b).features == {}
        assert set(gm.forward_signals(model, b, features=["text_hidden"]).features) == {"text_hidden"}
        many = gm.forward_signals(model, b, features=["text_hidden"], text_layer=[0, -1]).features["text_hidden"]
        full = model(**gm.model_inputs(model, b), output_hidden_states=True)
    assert set(many) == {0, -1}
    m = b["response_mask"]
    assert torch.allclose(many[0][m], _gathered(full.hidden_states[0], b["response_positions"])[m])
    assert torch.allclose(many[-1][m], _gathered(full.hidden_states[-1], b["response_positions"])[m])
    with pytest.raises(ValueError, match="unknown generative features"):
        gm.forward_signals(model, b, features=["text_pooled"])
    with pytest.raises(ValueError, match="out of range"):
        gm.forward_signals(model, b, features=["text_hidden"], text_layer=5)


def test_vision_pooled_averages_all_images_of_a_sample(nano, world):
    model, proc = nano["qwen2_5_vl"]
    out, _ = world
    rec = parse_record(
        {"images": ["images/train/000000.png", "images/train/000001.png"], "prompt": "Same shapes?", "response": "no"},
        "chat",
        line=1,
        base_dir=out,
    )
    b = gm.encode_chat(proc, [rec], [rec.load_images()])
    assert b["image_grid_thw"].shape[0] == 2
    with torch.no_grad():
        sig = gm.forward_signals(model, b, features=("vision_pooled",))
        full = model(**gm.model_inputs(model, b))
        enc = model.model.get_image_features(b["pixel_values"], b["image_grid_thw"], return_dict=True)
    assert torch.allclose(sig.features["vision_pooled"][0], torch.cat(enc.pooler_output).mean(0), atol=1e-5)
    assert torch.allclose(sig.logits[sig.mask], _gathered(full.logits, b["response_positions"])[sig.mask], atol=1e-5)


def test_response_ce_reduction(nano, sample):
    model, proc = nano["qwen3_vl"]
    recs, imgs = sample
    b = gm.encode_chat(proc, recs, imgs)
    with torch.no_grad():
        sig = gm.forward_signals(model, b)
    n = int(b["response_mask"].sum())
    mean = gm.response_ce(sig, b)
    assert torch.allclose(gm.response_ce(sig, b, num_items=2 * n), mean / 2)
    assert torch.allclose(gm.response_ce(sig, b, num_items=torch.tensor(2 * n)), mean / 2)
    sig.mask = torch.zeros_like(sig.mask)
    zero = gm.response_ce(sig, b)
    assert zero.item() == 0.0 and torch.isfinite(zero)
    # gradients flow to the model
    sig = gm.forward_signals(model, b)
    gm.response_ce(sig, b).backward()
    assert model.lm_head.weight.grad is not None
    model.zero_grad(set_to_none=True)


def test_sizes(pair):
    teacher, _, student, _ = pair
    assert gm.hidden_size(teacher) == 128 and gm.hidden_size(student) == 64
    assert gm.vision_feature_size(teacher) == 128 and gm.vision_feature_size(student) == 64
    assert gm.num_text_layers(teacher) == 4 and gm.num_text_layers(student) == 2


# ---------------------------------------------------------------------------------------------
# pairing


def test_check_pairing(pair, tok):
    teacher, t_proc, student, s_proc = pair
    gm.check_pairing(teacher, t_proc, student, s_proc)  # same tokenizer, different image sizes: fine
    other_tok = train_qwen_tokenizer([f"the {c} {s} is {w}" for c in ("red", "blue") for s in ("cube", "ball") for w in ("here", "there")], vocab_size=400)
    other, o_proc = build_tiny_vlm(None, [], kind="qwen3_vl", preset="vlm-nano", tokenizer=other_tok)
    with pytest.raises(PairingError, match="tokenizers differ") as e:
        gm.check_pairing(teacher, t_proc, other, o_proc)
    msg = str(e.value)
    assert "\n" not in msg and "teacher_response" in msg and "sft" in msg
    gm.check_pairing(teacher, t_proc, other, o_proc, need_logits=False)
    wide, w_proc = build_tiny_vlm(None, [], kind="qwen3_vl", preset="vlm-nano", tokenizer=tok, overrides={"text_config.vocab_size": len(tok) + 64})
    with pytest.raises(PairingError, match=f"output vocab sizes differ \\({len(tok)} vs {len(tok) + 64}\\)"):
        gm.check_pairing(teacher, t_proc, wide, w_proc)


# ---------------------------------------------------------------------------------------------
# students


def test_scratch_student_overrides_and_fixups(pair, sample):
    teacher, _, _, s_proc = pair
    recs, imgs = sample
    overrides = {
        "text_config.num_hidden_layers": 1,
        "text_config.hidden_size": 48,
        "text_config.head_dim": 8,
        "text_config.num_attention_heads": 4,
        "text_config.intermediate_size": 96,
        "vision_config.depth": 1,
        "vision_config.hidden_size": 32,
        "vision_config.deepstack_visual_indexes": [0, 1],
    }
    s = gm.scratch_student(teacher.config, overrides, seed=3)
    assert type(s) is type(teacher)
    assert s.config.text_config.hidden_size == 48 and s.config.vision_config.out_hidden_size == 48
    assert sum(s.config.text_config.rope_parameters["mrope_section"]) == 4  # head_dim / 2
    assert s.config.vision_config.deepstack_visual_indexes == [0]  # index 1 no longer exists
    assert param_count(s) < param_count(teacher)
    assert teacher.config.text_config.hidden_size == 128  # the teacher's config is untouched
    again = gm.scratch_student(teacher.config, overrides, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(s.state_dict().values(), again.state_dict().values()))
    b = gm.encode_chat(s_proc, recs, imgs)
    with torch.no_grad():
        assert gm.forward_signals(s.eval(), b).logits.shape[-1] == teacher.lm_head.out_features
    with pytest.raises(ValueError, match="has no 'hiden_size'"):
        gm.scratch_student(teacher.config, {"text_config.hiden_size": 8}, seed=0)
    with pytest.raises(ValueError, match="out_hidden_size=32 must equal text_config.hidden_size=128"):
        gm.scratch_student(teacher.config, {"vision_config.out_hidden_size": 32}, seed=0)
    with pytest.raises(ValueError, match="must sum to head_dim/2"):
        rope = {"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 2, 2], "mrope_interleaved": True}
        gm.scratch_student(teacher.config, {"text_config.rope_parameters": rope}, seed=0)


@pytest.fixture(scope="module")
def deep_teacher(tok):
    """Qwen3-VL teacher with 4 text layers and 2 vision blocks, deepstack from vision block 1."""
    model, proc = build_tiny_vlm(
        None, [], kind="qwen3_vl", preset="vlm-teacher", tokenizer=tok, overrides={"vision_config.deepstack_visual_indexes": [1]}
    )
    return model.eval(), proc


def test_inherit_all_layers_reproduces_teacher(deep_teacher, sample):
    teacher, proc = deep_teacher
    recs, imgs = sample
    full = gm.inherit_student(teacher, {"text": [0, 1, 2, 3], "vision": [0, 1]}).eval()
    b = gm.encode_chat(proc, recs, imgs)
    with torch.no_grad():
        a = gm.forward_signals(teacher, b, features=("vision_pooled",))
        c = gm.forward_signals(full, b, features=("vision_pooled",))
    assert torch.allclose(a.logits, c.logits, atol=1e-6)
    assert torch.allclose(a.features["vision_pooled"], c.features["vision_pooled"], atol=1e-6)


def test_inherit_layer_subset_saves_and_reloads(deep_teacher, sample, tmp_path):
    teacher, proc = deep_teacher
    recs, imgs = sample
    s = gm.inherit_student(teacher, {"text": [0, 3], "vision": [1]})
    assert type(s) is type(teacher)
    assert s.config.text_config.num_hidden_layers == 2 and s.config.vision_config.depth == 1
    assert s.config.vision_config.deepstack_visual_indexes == [0]  # vision block 1 is now block 0
    assert param_count(s) < param_count(teacher)
    t_sd, s_sd = teacher.state_dict(), s.state_dict()
    k = "model.language_model.layers.{}.mlp.down_proj.weight"
    assert torch.equal(s_sd[k.format(1)], t_sd[k.format(3)])
    k = "model.visual.blocks.{}.attn.qkv.weight"
    assert torch.equal(s_sd[k.format(0)], t_sd[k.format(1)])
    assert torch.equal(s_sd["model.visual.merger.linear_fc1.weight"], t_sd["model.visual.merger.linear_fc1.weight"])
    assert torch.equal(s_sd["lm_head.weight"], t_sd["lm_head.weight"])
    # dropping the deepstack block drops its merger
    s2 = gm.inherit_student(teacher, {"vision": [0]})
    assert s2.config.vision_config.deepstack_visual_indexes == [] and len(s2.model.visual.deepstack_merger_list) == 0
    s.save_pretrained(tmp_path)
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    assert type(loaded) is type(teacher)
    b = gm.encode_chat(proc, recs, imgs)
    with torch.no_grad():
        x, y = gm.forward_signals(s.eval(), b), gm.forward_signals(loaded, b)
    assert torch.allclose(x.logits, y.logits, atol=1e-6)


def test_inherit_refuses_bad_layers_and_widths(deep_teacher):
    teacher, _ = deep_teacher
    with pytest.raises(PairingError, match="distinct indices"):
        gm.inherit_student(teacher, {"text": [0, 9]})
    with pytest.raises(PairingError, match="distinct indices"):
        gm.inherit_student(teacher, {"text": [1, 1]})
    with pytest.raises(PairingError, match="unknown tower"):
        gm.inherit_student(teacher, {"audio": [0]})
    with pytest.raises(ValueError, match="width override 'text_config.hidden_size' is not supported"):
        gm.inherit_student(teacher, {"text": [0]}, {"text_config.hidden_size": 64})


@pytest.mark.parametrize("kind", ["qwen2_5_vl", "qwen3_vl_moe", "qwen3_omni_thinker"])
def test_inherit_other_kinds(kind, tok, sample):
    overrides = {"vision_config.depth": 2}
    if kind != "qwen2_5_vl":
        overrides["vision_config.deepstack_visual_indexes"] = [0, 1]
    teacher, proc = build_tiny_vlm(None, [], kind=kind, preset="vlm-student", tokenizer=tok, overrides=overrides)
    teacher.eval()
    recs, imgs = sample
    b = gm.encode_chat(proc, recs[:2], imgs[:2])
    full = gm.inherit_student(teacher, {"text": [0, 1], "vision": [0, 1]}).eval()
    small = gm.inherit_student(teacher, {"text": [1], "vision": [1]}).eval()
    with torch.no_grad():
        assert torch.allclose(gm.forward_signals(teacher, b).logits, gm.forward_signals(full, b).logits, atol=1e-6)
        assert gm.forward_signals(small, b).logits.shape[:2] == b["response_ids"].shape
    assert param_count(small) < param_count(teacher)
    assert small.config.text_config.num_hidden_layers == 1 and small.config.vision_config.depth == 1
    if kind == "qwen2_5_vl":  # block 0 is the full-attention one; dropping it leaves window attention only
        assert teacher.config.vision_config.fullatt_block_indexes == [0]
        assert small.config.vision_config.fullatt_block_indexes == []
    else:  # the deepstack merger of the kept vision block 1 moves to slot 0 (Omni calls the list merger_list)
        assert small.config.vision_config.deepstack_visual_indexes == [0]
        mergers = "model.visual.merger_list" if kind == "qwen3_omni_thinker" else "model.visual.deepstack_merger_list"
        t_sd, s_sd = teacher.state_dict(), small.state_dict()
        names = [n for n in s_sd if n.startswith(mergers + ".0.")]
        assert names and all(torch.equal(s_sd[n], t_sd[n.replace(".0.", ".1.", 1)]) for n in names)
        assert not any(n.startswith(mergers + ".1.") for n in s_sd)


def test_inherit_text_only_model(tok):
    """The same surgery works on a text-only decoder (a Qwen3 reranker), keeping its class."""
    from mmdistill.models.tiny import build_tiny_seq_cls

    teacher, t_tok = build_tiny_seq_cls(None, [], preset="vlm-student", tokenizer=tok)
    s = gm.inherit_student(teacher.eval(), {"text": [1]})
    assert type(s) is type(teacher) and s.config.num_hidden_layers == 1
    full = gm.inherit_student(teacher, {"text": [0, 1]}).eval()
    enc = t_tok(["a red star"], return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(teacher(**enc).logits, full(**enc).logits, atol=1e-6)
    with pytest.raises(ValueError, match="cannot find the vision blocks"):
        gm.inherit_student(teacher, {"vision": [0]})


def test_inherit_moe_keeps_each_layers_mlp_kind(tok):
    """decoder_sparse_step=2: layers 1 and 3 are MoE; keeping [1, 2, 3] must keep MoE / dense / MoE."""
    teacher, _ = build_tiny_vlm(None, [], kind="qwen3_vl_moe", preset="vlm-student", tokenizer=tok, overrides={"text_config.num_hidden_layers": 4, "text_config.decoder_sparse_step": 2})
    kinds = lambda m: [type(layer.mlp).__name__.endswith("SparseMoeBlock") for layer in m.model.language_model.layers]  # noqa: E731
    assert kinds(teacher) == [False, True, False, True]
    s = gm.inherit_student(teacher, {"text": [1, 2, 3]})
    assert kinds(s) == [True, False, True]
    t_sd, s_sd = teacher.state_dict(), s.state_dict()
    assert all(torch.equal(v, t_sd[k.replace("layers.0.", "layers.1.", 1)]) for k, v in s_sd.items() if "layers.0.mlp" in k)


# ---------------------------------------------------------------------------------------------
# loading


def test_load_vlm_roundtrip_omni_thinker(tok, sample, tmp_path):
    model, proc = build_tiny_vlm(tmp_path / "omni", [], kind="qwen3_omni_thinker", preset="vlm-nano", tokenizer=tok)
    loaded, l_proc = gm.load_vlm(tmp_path / "omni")
    assert type(loaded).__name__ == "Qwen3OmniMoeThinkerForConditionalGeneration"
    recs, imgs = sample
    b = gm.encode_chat(l_proc, recs[:2], imgs[:2])
    with torch.no_grad():
        assert torch.allclose(gm.forward_signals(model.eval(), b).logits, gm.forward_signals(loaded.eval(), b).logits, atol=1e-6)
    with pytest.raises(FileNotFoundError, match="cannot load model .*no such folder") as e:
        gm.load_vlm(str(tmp_path / "missing"))
    assert "\n" not in str(e.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="cannot load model") as e:
        gm.load_vlm(tmp_path / "empty")
    assert "\n" not in str(e.value)
