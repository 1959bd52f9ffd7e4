"""Heterogeneous dual-encoder students: a timm image tower + a tiny text tower (CLIP-style or BERT) with its own WordPiece tokenizer,
saved as a VisionTextDualEncoderModel that plain transformers reloads, driven by the CLIP adapter and recipe."""

import pytest
import torch
from PIL import Image
from transformers import AutoModel, AutoProcessor

from mmdistill.config import recipe_from_dict
from mmdistill.losses.composite import build_contrastive_loss
from mmdistill.models import contrastive as cm
from mmdistill.models import dual
from mmdistill.recipes import contrastive as rc

TEXTS = [f"a {s} {c} {k} at the {p}" for s in ("small", "large") for c in ("red", "blue", "green") for k in ("circle", "square") for p in ("top left", "center")]
TIMM = dict(timm_name="resnet10t", model_args={"channels": [8, 16, 16, 32], "stem_width": 8})


def _images(n=4, size=40):
    return [Image.new("RGB", (size, size), (30 * i, 200 - 20 * i, 90)) for i in range(n)]


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    d = tmp_path_factory.mktemp("dual")
    model, proc = dual.build_dual_student(TEXTS, **TIMM, image_size=32, projection_dim=24, hidden_size=16, num_attention_heads=2, intermediate_size=32, out_dir=d)
    return d, model, proc


def test_dual_student_saves_as_a_folder_plain_transformers_reloads(student):
    d, model, proc = student
    loaded, lproc = AutoModel.from_pretrained(d), AutoProcessor.from_pretrained(d)
    assert type(loaded).__name__ == "VisionTextDualEncoderModel"
    assert type(loaded.vision_model).__name__ == "TimmWrapperModel" and type(loaded.text_model).__name__ == "CLIPTextModel"
    assert loaded.config.vision_config.architecture == "resnet10t"
    assert loaded.config.vision_config.hidden_size == 32 == loaded.vision_model.timm_model.num_features
    # the processor is the student's own: WordPiece with BERT framing, not the CLIP teacher's BPE
    enc = lproc(text=TEXTS[:2], images=_images(2), return_tensors="pt", padding=True)
    ids = enc["input_ids"][0].tolist()
    assert lproc.tokenizer.convert_ids_to_tokens(ids[0]) == "[CLS]" and "[SEP]" in lproc.tokenizer.convert_ids_to_tokens(ids)
    model.eval(), loaded.eval()
    with torch.no_grad():
        a = loaded.get_image_features(pixel_values=enc["pixel_values"]).pooler_output
        b = model.get_image_features(pixel_values=enc["pixel_values"]).pooler_output
        t = loaded.get_text_features(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).pooler_output
    assert a.shape == (2, 24) and t.shape == (2, 24)
    assert torch.allclose(a, b, atol=1e-6)


def test_the_clip_adapter_encodes_the_dual_student(student):
    d, _, _ = student
    model, proc = cm.load_model(str(d))
    model.eval()
    data = cm.preprocess_pairs(proc, _images(3), TEXTS[:3])
    with torch.no_grad():
        sig = cm.encode(model, data.batch([0, 1, 2]), features=True)
    assert sig.image_embeds.shape == sig.text_embeds.shape == (3, 24)
    assert cm.embed_dim(model) == 24 and float(sig.logit_scale) == pytest.approx(1 / 0.07, rel=1e-3)
    # tower features before the projections: the CNN's pooled map [B, C] and the text tower's masked mean [B, H]
    assert sig.features["vision_pooled"].shape == (3, 32) and sig.features["text_pooled"].shape == (3, 16)
    assert sig.logit_bias is None


def test_the_clip_text_tower_pools_at_the_end_token(student):
    """The default text tower's pooled output is its (final-LN) state at [SEP], and with causal attention nothing after
    [SEP] (padding) can change it; the projection of that state is the text embedding."""
    _, model, proc = student
    model.eval()
    assert model.config.text_config.eos_token_id == proc.tokenizer.sep_token_id != 2
    enc = proc.tokenizer(TEXTS[:3], padding="max_length", max_length=24, return_tensors="pt")
    with torch.no_grad():
        out = model.text_model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
        emb = model.get_text_features(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).pooler_output
        ends = (enc["input_ids"] == proc.tokenizer.sep_token_id).int().argmax(-1)
        assert torch.allclose(out.pooler_output, out.last_hidden_state[torch.arange(3), ends], atol=1e-6)
        assert torch.allclose(emb, model.text_projection(out.pooler_output), atol=1e-6)
        ids = enc["input_ids"].clone()
        ids[0, ends[0] + 1 :] = 7  # other tokens after the end token
        again = model.text_model(input_ids=ids, attention_mask=torch.ones_like(ids)).pooler_output
    assert torch.allclose(again[0], out.pooler_output[0], atol=1e-5)


def test_the_bert_text_tower_saves_and_reloads(tmp_path):
    model, proc = dual.build_dual_student(TEXTS, **TIMM, text_arch="bert", image_size=32, projection_dim=24, hidden_size=16, num_attention_heads=2, intermediate_size=32, out_dir=tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path)
    assert type(loaded.text_model).__name__ == "BertModel"
    enc = proc.tokenizer(TEXTS[:2], padding=True, return_tensors="pt")
    model.eval(), loaded.eval()
    with torch.no_grad():
        a = loaded.get_text_features(**enc).pooler_output
        b = model.get_text_features(**enc).pooler_output
    assert a.shape == (2, 24) and torch.allclose(a, b, atol=1e-6)


def test_a_clip_text_tower_needs_a_usable_end_token():
    from transformers import PreTrainedTokenizerFast

    tok = dual.train_wordpiece(TEXTS, vocab_size=60)
    with pytest.raises(dual.DualTowerError, match="text_tower.arch: 'gpt' is not one of clip, bert"):
        dual.build_dual_student(TEXTS, **TIMM, text_arch="gpt", tokenizer=tok)
    # a tokenizer whose end token is id 2 would hit transformers' legacy CLIP pooling (the largest id)
    specials = ["[PAD]", "[UNK]", "[SEP]", "[CLS]", "[MASK]"]
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    raw = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    raw.train_from_iterator(TEXTS, trainers.WordPieceTrainer(vocab_size=60, special_tokens=specials, show_progress=False))
    odd = PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="[PAD]", unk_token="[UNK]", sep_token="[SEP]", cls_token="[CLS]", mask_token="[MASK]")
    assert odd.sep_token_id == 2
    with pytest.raises(dual.DualTowerError, match="end token has id 2"):
        dual.build_dual_student(TEXTS, **TIMM, tokenizer=odd)
    dual.build_dual_student(TEXTS, **TIMM, tokenizer=odd, text_arch="bert")  # BERT pools at [CLS]: fine


def test_an_unknown_timm_name_names_close_matches():
    with pytest.raises(dual.DualTowerError, match=r"'resnet10' is not a timm model; close matches: .*resnet10t"):
        dual.build_dual_student(TEXTS, timm_name="resnet10")
    with pytest.raises(dual.DualTowerError, match="rejects them"):
        dual.build_dual_student(TEXTS, timm_name="resnet10t", model_args={"no_such_option": 1})


def test_unset_tower_widths_are_clear_errors(monkeypatch):
    with pytest.raises(dual.DualTowerError, match="projection_dim is unset"):
        dual.build_dual_student(TEXTS, **TIMM, projection_dim=None)
    with pytest.raises(dual.DualTowerError, match="text_tower.hidden_size is unset"):
        dual.build_dual_student(TEXTS, **TIMM, hidden_size=0)
    # a timm model that reports no pooled width (num_features) cannot be projected
    import timm

    real = timm.create_model

    def no_width(*a, **k):
        m = real(*a, **k)
        m.num_features = None
        return m

    monkeypatch.setattr(timm, "create_model", no_width)
    with pytest.raises(dual.DualTowerError, match="reports no output width"):
        dual.build_dual_student(TEXTS, **TIMM)


def _recipe(tmp_path, teacher_dir, **student):
    return recipe_from_dict(
        {
            "output_dir": str(tmp_path / "run"),
            "data": {"train": str(tmp_path / "x.jsonl")},
            "teacher": {"model": str(teacher_dir)},
            "student": {"init": "dual", "dual": {"image_tower": {"timm": "resnet10t", "model_args": TIMM["model_args"], "image_size": 32}, "text_tower": {"hidden_size": 16, **student}, "projection_dim": 24}},
            "loss": {"terms": {"clip": {}, "sim_kd": {}, "fd": {"weight": 10.0}, "crd": {}, "icl": {}, "affinity": {}}},
        }
    )


def test_teacher_signals_come_from_the_teachers_own_tokenization(tmp_path):
    """KD with a student on another tokenizer: the step feeds each model its own processor's ids, every
    contrastive term runs (fd / icl with learned projections 24 -> 32), and the student's weights move."""
    t_dir = tmp_path / "teacher"
    teacher, t_proc = cm.build_tiny_clip(t_dir, TEXTS, preset="clip-nano", image_size=32, patch_size=8)
    teacher.eval()
    recipe = _recipe(tmp_path, t_dir)
    student, s_proc = rc.build_student(recipe, teacher, t_proc, TEXTS)
    images = _images(6)
    s_data, t_data = cm.preprocess_pairs(s_proc, images, TEXTS[:6]), cm.preprocess_pairs(t_proc, images, TEXTS[:6])
    assert s_data.input_ids.shape != t_data.input_ids.shape or not torch.equal(s_data.input_ids, t_data.input_ids)
    terms = {n: {"weight": t.weight, **t.options} for n, t in recipe.loss.terms.items()}
    loss = build_contrastive_loss(terms, cm.embed_dim(student), cm.embed_dim(teacher))
    step = rc.ContrastiveStep(student, loss, s_data, teacher=teacher, t_data=t_data)
    idx = [0, 2, 4, 5]
    # what the teacher sees, built independently: its own processor on the raw texts
    own = t_proc.tokenizer([TEXTS[i] for i in idx], padding="longest", return_tensors="pt")
    with torch.no_grad():
        ref = cm.encode(teacher, {"pixel_values": cm.preprocess_images(t_proc, [images[i] for i in idx]), "input_ids": own["input_ids"], "attention_mask": own["attention_mask"]})
    got = step.teacher_signals(step.prepare(idx, 0.0), torch.device("cpu"))
    assert torch.allclose(got.text_embeds, ref.text_embeds, atol=1e-5) and torch.allclose(got.image_embeds, ref.image_embeds, atol=1e-5)
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    opt = torch.optim.AdamW(list(student.parameters()) + list(loss.parameters()), lr=1e-2)
    out = step(idx, 0.0)
    assert set(out) == {"loss", "clip", "sim_kd", "fd", "crd", "icl", "affinity"} and torch.isfinite(out["loss"])
    out["loss"].backward()
    opt.step()
    moved = [n for n, p in student.named_parameters() if not torch.equal(p, before[n])]
    assert any(n.startswith("vision_model.") for n in moved) and any(n.startswith("text_model.") for n in moved)
    assert "visual_projection.weight" in moved and "text_projection.weight" in moved


def test_the_student_can_share_the_teachers_tokenizer(tmp_path):
    t_dir = tmp_path / "teacher"
    teacher, t_proc = cm.build_tiny_clip(t_dir, TEXTS, preset="clip-nano", image_size=32, patch_size=8)
    student, s_proc = rc.build_student(_recipe(tmp_path, t_dir, tokenizer="teacher"), teacher, t_proc, TEXTS)
    assert s_proc.tokenizer is t_proc.tokenizer and student.config.text_config.vocab_size == len(t_proc.tokenizer)
    with pytest.raises(Exception, match="tokenizer=teacher needs a `teacher:` section"):
        rc.build_student(_recipe(tmp_path, t_dir, tokenizer="teacher"), None, None, TEXTS)


def test_the_shipped_dual_student_is_at_most_15_percent_of_the_shipped_teacher(tmp_path):
    """configs/contrastive/shapesworld-dual-*.yaml against shapesworld-teacher.yaml, both built on ShapesWorld captions."""
    from mmdistill import api
    from mmdistill.config import load_recipe
    from mmdistill.data.synth import generate

    generate(tmp_path / "sw", n=300, seed=0, size=32)
    texts = [__import__("json").loads(line)["text"] for line in (tmp_path / "sw/pairs_train.jsonl").read_text().splitlines()]
    t_recipe = load_recipe(api.shipped_config("contrastive/shapesworld-teacher.yaml"))
    teacher, t_proc = cm.build_tiny_clip(None, texts, preset=t_recipe.student.preset)
    n_teacher = sum(p.numel() for p in teacher.parameters())
    for name in ("shapesworld-dual-baseline.yaml", "shapesworld-dual-kd.yaml"):
        recipe = load_recipe(api.shipped_config(f"contrastive/{name}"))
        student, proc = rc.build_student(recipe, teacher, t_proc, texts)
        parts = dual.tower_parameters(student)
        assert parts["total"] <= 0.15 * n_teacher, (name, parts, n_teacher)
        assert type(student.vision_model).__name__ == "TimmWrapperModel" and proc.tokenizer is not t_proc.tokenizer


def test_the_image_tower_starts_from_pretrained_timm_weights(tmp_path):
    """A timm checkpoint with its classifier (as published: a folder with model.safetensors) seeds the image tower;
    the tower's weights and BatchNorm statistics are then the checkpoint's, the classifier is dropped."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(3)
    src = timm.create_model("resnet10t", pretrained=False, num_classes=7, **TIMM["model_args"])
    with torch.no_grad():
        src.bn1.running_mean.uniform_(-1, 1)  # not the init value, so a copy is visible
    state = {k: v.contiguous() for k, v in src.state_dict().items() if not k.endswith("num_batches_tracked")}
    (tmp_path / "ckpt").mkdir()
    save_file(state, tmp_path / "ckpt" / "model.safetensors")
    model, _ = dual.build_dual_student(TEXTS, **TIMM, image_weights=tmp_path / "ckpt", image_size=32, projection_dim=24, hidden_size=16, intermediate_size=32)
    tower = model.vision_model.timm_model.state_dict()
    assert "fc.weight" in state and "fc.weight" not in tower
    for k, v in state.items():
        if k in tower:
            assert torch.equal(tower[k], v), k
    # the same checkpoint through a saved TimmWrapperModel's key prefix, as a single file
    save_file({f"timm_model.{k}": v for k, v in state.items() if not k.startswith("fc.")}, tmp_path / "wrapped.safetensors")
    again, _ = dual.build_dual_student(TEXTS, **TIMM, image_weights=tmp_path / "wrapped.safetensors", image_size=32, projection_dim=24, hidden_size=16, intermediate_size=32)
    assert torch.equal(again.vision_model.timm_model.conv1[0].weight, src.conv1[0].weight)


def test_image_tower_weights_that_do_not_fit_are_clear_errors(tmp_path):
    import timm
    from safetensors.torch import save_file

    wide = timm.create_model("resnet10t", pretrained=False, num_classes=0, channels=[16, 32, 32, 64], stem_width=16)  # twice the widths of TIMM's
    save_file({k: v.contiguous() for k, v in wide.state_dict().items()}, tmp_path / "wide.safetensors")
    with pytest.raises(dual.DualTowerError, match=r"wide.safetensors: bn1.bias has shape \(32,\), the tower's is \(16,\) \(weights for another width: check model_args\)"):
        dual.build_dual_student(TEXTS, **TIMM, image_weights=tmp_path / "wide.safetensors")
    other = timm.create_model("mobilenetv3_small_050", pretrained=False, num_classes=0)
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, tmp_path / "other.safetensors")
    with pytest.raises(dual.DualTowerError, match=r"other.safetensors does not fit timm ResNet: \d+ tower weights missing from it .*; \d+ weights the tower lacks"):
        dual.build_dual_student(TEXTS, **TIMM, image_weights=tmp_path / "other.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(dual.DualTowerError, match="holds none of model.safetensors, pytorch_model.bin"):
        dual.build_dual_student(TEXTS, **TIMM, image_weights=tmp_path / "empty")
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(dual.DualTowerError, match="junk.safetensors is not a readable checkpoint"):
        dual.build_dual_student(TEXTS, **TIMM, image_weights=tmp_path / "junk.safetensors")
    with pytest.raises(dual.DualTowerError, match="does not exist"):
        dual.build_dual_student(TEXTS, **TIMM, image_weights=tmp_path / "nope.pth")


def test_the_text_tower_starts_from_a_pretrained_bert_folder(tmp_path):
    """A BERT folder (weights + its tokenizer) becomes the text tower as it is; the saved student reloads with both."""
    from transformers import BertConfig, BertModel, DistilBertConfig, DistilBertModel

    tok = dual.train_wordpiece(TEXTS, vocab_size=80)
    torch.manual_seed(5)
    bert = BertModel(BertConfig(vocab_size=len(tok), hidden_size=24, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48, max_position_embeddings=32))
    bert.save_pretrained(tmp_path / "bert")
    tok.save_pretrained(tmp_path / "bert")
    model, proc = dual.build_dual_student(TEXTS, **TIMM, text_weights=tmp_path / "bert", image_size=32, projection_dim=24, out_dir=tmp_path / "student")
    assert model.config.text_config.hidden_size == 24 and proc.tokenizer.get_vocab() == tok.get_vocab()
    for (name, a), (_, b) in zip(model.text_model.state_dict().items(), bert.state_dict().items()):
        assert torch.equal(a, b), name
    loaded = AutoModel.from_pretrained(tmp_path / "student")
    assert torch.equal(loaded.text_model.embeddings.word_embeddings.weight, bert.embeddings.word_embeddings.weight)
    with pytest.raises(dual.DualTowerError, match="comes with its own tokenizer"):
        dual.build_dual_student(TEXTS, **TIMM, text_weights=tmp_path / "bert", tokenizer=tok)
    DistilBertModel(DistilBertConfig(vocab_size=len(tok), dim=16, n_layers=1, n_heads=2, hidden_dim=32)).save_pretrained(tmp_path / "distil")
    tok.save_pretrained(tmp_path / "distil")
    with pytest.raises(dual.DualTowerError, match=r"DistilBertModel\) has no pooled output"):
        dual.build_dual_student(TEXTS, **TIMM, text_weights=tmp_path / "distil")
    with pytest.raises(dual.DualTowerError, match="not a Hugging Face model folder"):
        dual.build_dual_student(TEXTS, **TIMM, text_weights=tmp_path / "nowhere")
