"""Reranker adapter: the Qwen3(-VL)-Reranker prompt format, yes/no scores from the real forward,
left padding, sequence-classification heads, and the errors a user can hit."""

import pytest
import torch
from PIL import Image

from mmdistill.data.records import RecordError, parse_record
from mmdistill.models import reranker as rm
from mmdistill.models.tiny import train_qwen_tokenizer

TEXTS = [f"a {s} {c} {k} at the {p}" for s in ("small", "large") for c in ("red", "blue", "green") for k in ("circle", "square") for p in ("top", "left")]
TEXTS += [rm.SYSTEM_PROMPT, "<Instruct>: <Query>: <Document>: yes no", "Given a caption, find the matching image."]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("rr")
    for i, colour in enumerate([(200, 30, 30), (30, 30, 200), (30, 200, 30)]):
        Image.new("RGB", (64, 64), colour).save(d / f"{i}.png")
    return d


@pytest.fixture(scope="module")
def tok():
    return train_qwen_tokenizer(TEXTS, vocab_size=400)


@pytest.fixture(scope="module")
def yesno(tmp_path_factory, tok):
    d = tmp_path_factory.mktemp("yesno")
    rm.build_tiny_reranker(d, TEXTS, kind="yesno", preset="vlm-nano", tokenizer=tok)
    r = rm.load_reranker(str(d))
    r.model.eval()
    return r


def _rec(folder, obj):
    return parse_record(obj, "rerank", path=str(folder / "q.jsonl"), line=3, base_dir=folder)


def test_prompt_is_the_qwen3_vl_reranker_format(yesno, folder):
    rec = _rec(folder, {"instruction": "Given a caption, find the matching image.", "query": {"text": "a red circle"}, "documents": [{"image": "0.png"}, {"text": "a blue square"}]})
    images = []
    text = yesno.format_pair(rec, 0, images)
    assert text == (
        "<|im_start|>system\n" + rm.SYSTEM_PROMPT + "<|im_end|>\n<|im_start|>user\n"
        "<Instruct>: Given a caption, find the matching image.\n<Query>: a red circle\n"
        "<Document>: <|vision_start|><|image_pad|><|vision_end|><|im_end|>\n<|im_start|>assistant\n"
    )
    assert len(images) == 1
    assert yesno.format_pair(rec, 1, []).endswith("<Document>: a blue square<|im_end|>\n<|im_start|>assistant\n")


def test_yes_no_score_is_the_logit_difference_at_the_last_position(yesno, folder):
    rec = _rec(folder, {"query": {"image": "1.png"}, "documents": [{"text": "a blue square"}, {"text": "a red circle at the top left"}, {"image": "2.png", "text": "green"}], "labels": [1, 0, 0]})
    sig = yesno.signals([rec], features=True)
    assert sig.scores.shape == (1, 3) and sig.mask.all()
    assert sig.features["last_token"].shape == (1, 3, yesno.hidden_size())
    # reference: the plain HF forward of each pair alone, full logits at the last position
    for k in range(3):
        images = []
        text = yesno.format_pair(rec, k, images)
        enc = yesno.processor(text=[text], images=images or None, return_tensors="pt")
        with torch.no_grad():
            logits = yesno.model(**enc).logits[0, -1]
        want = logits[yesno.yes_id] - logits[yesno.no_id]
        assert torch.allclose(sig.scores[0, k], want, atol=1e-4)
        p_yes = torch.softmax(torch.stack([logits[yesno.no_id], logits[yesno.yes_id]]), 0)[1]
        assert torch.allclose(torch.sigmoid(sig.scores[0, k]), p_yes, atol=1e-5)


def test_ragged_groups_are_masked_and_left_padding_changes_nothing(yesno, folder):
    a = _rec(folder, {"query": {"text": "a red circle"}, "documents": [{"image": "0.png"}, {"image": "1.png"}, {"image": "2.png"}]})
    b = _rec(folder, {"query": {"text": "a very long query about a large green square at the top left and more"}, "documents": [{"image": "2.png"}]})
    both = yesno.signals([a, b])
    assert both.mask.tolist() == [[True, True, True], [True, False, False]]
    alone = yesno.signals([b])
    assert torch.allclose(both.scores[1, 0], alone.scores[0, 0], atol=1e-4)
    got = yesno.score_records([a, b], batch_pairs=2)  # one query per batch here
    assert [len(g) for g in got] == [3, 1]
    assert got[0] == pytest.approx(both.scores[0].tolist(), abs=1e-4) and got[1] == pytest.approx([both.scores[1, 0].item()], abs=1e-4)


def test_seq_cls_head_scores_text_and_refuses_images(tmp_path, tok, folder):
    r = rm.build_tiny_reranker(tmp_path / "cls", TEXTS, kind="seq_cls", preset="vlm-nano", tokenizer=tok)
    loaded = rm.load_reranker(str(tmp_path / "cls"))
    assert loaded.kind == "seq_cls" and not loaded.has_vision
    rec = _rec(folder, {"query": {"text": "a red circle"}, "documents": [{"text": "a red circle"}, {"text": "a blue square"}]})
    loaded.model.eval()
    sig = loaded.signals([rec], features=True)
    assert sig.scores.shape == (1, 2) and sig.features["last_token"].shape[:2] == (1, 2)
    with torch.no_grad():
        text = loaded.format_pair(rec, 1, [])
        want = loaded.model(**loaded.tokenizer([text], return_tensors="pt")).logits[0, 0]
    assert torch.allclose(sig.scores[0, 1], want, atol=1e-4)
    img = _rec(folder, {"query": {"text": "a red circle"}, "documents": [{"image": "0.png"}]})
    with pytest.raises(RecordError, match=r"q.jsonl:3: documents.0.image: .*reads text only"):
        r.signals([img], path=str(folder / "q.jsonl"))


def test_yes_no_reranker_needs_single_tokens(tok):
    from transformers import Qwen2Tokenizer

    vocab = {"y": 0, "e": 1, "s": 2, "n": 3, "o": 4, "ye": 5}
    bad = Qwen2Tokenizer(vocab=vocab, merges=[("y", "e")], unk_token=None, bos_token=None, eos_token=None, pad_token=None)
    with pytest.raises(rm.RerankerError, match=r"'yes' is not a single token"):
        rm.single_token_id(bad, "yes", "my-model")
    assert rm.single_token_id(tok, "yes", "tiny") == tok.convert_tokens_to_ids("yes")


def test_load_reranker_missing_folder_is_one_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="cannot load reranker"):
        rm.load_reranker(str(tmp_path / "nope"))


# ------------------------------------------------------------------ shared prompt prefix (inference)


def _text_rerankers(tmp_path, tok):
    from mmdistill.models.tiny import build_tiny_lm, build_tiny_moe_lm, build_tiny_seq_cls

    cls, _ = build_tiny_seq_cls(None, TEXTS, preset="vlm-nano", tokenizer=tok)
    lm, _ = build_tiny_lm(None, TEXTS, preset="vlm-nano", tokenizer=tok)
    moe, _ = build_tiny_moe_lm(None, TEXTS, preset="vlm-nano", tokenizer=tok, num_experts=4, top_k=2)
    return [rm.Reranker(m.eval(), tok, kind=k, name=n) for m, k, n in ((cls, "seq_cls", "cls"), (lm, "yesno", "lm"), (moe, "yesno", "moe"))]


@pytest.mark.parametrize("features", [False, True])
def test_shared_prefix_scores_match_the_plain_forward(tmp_path, tok, folder, features):
    """The system prompt + instruction (+ query within one record) run once and the rest of each pair on a copy of
    their KV cache: the scores and last-token features equal the plain left-padded forward's, for a seq-cls head,
    a causal LM and a MoE causal LM, in a batch of ragged groups (a query's documents share its tokens too; the two
    queries starting "a red circle" share some of theirs) and documents of very different lengths."""
    recs = [
        _rec(folder, {"query": {"text": "a red circle"}, "documents": [{"text": "a red circle"}, {"text": "a blue square at the top left of it all"}, {"text": "no"}]}),
        _rec(folder, {"query": {"text": "a large green square at the top"}, "documents": [{"text": "a small green square"}]}),
        _rec(folder, {"query": {"text": "a red circle at the top left of a large blue square"}, "documents": [{"text": "a red"}, {"text": "a red circle at the top"}]}),
    ]
    for r in _text_rerankers(tmp_path, tok):
        assert r.can_share_prefix()
        with torch.no_grad():
            r.share_prefix = False
            plain = r.signals(recs, features=features)
            r.share_prefix = True
            shared = r.signals(recs, features=features)
            assert len(r._prefixes) == 1  # the queries share the system prompt and the instruction
            prefix = next(iter(r._prefixes))
            assert len(prefix) >= rm.MIN_SHARED_PREFIX
            one = r.signals(recs[:1], features=features)  # one record: its query is in the shared prefix too
            assert len(r._prefixes) == 2 and len(list(r._prefixes)[-1]) > len(prefix)
        assert torch.allclose(shared.scores, plain.scores, atol=1e-5), (r.name, shared.scores, plain.scores)
        assert torch.allclose(one.scores[0], plain.scores[0], atol=1e-5)
        if features:
            assert torch.allclose(shared.features["last_token"], plain.features["last_token"], atol=1e-5)
        with torch.no_grad():  # the cached prefix is not changed by being used: a second call gives the same scores
            again = r.signals(recs, features=features)
        assert torch.equal(again.scores, shared.scores)
        r.share_prefix = True  # setting it (after the weights change, say) drops the kept caches
        assert not r._prefixes


def test_shared_prefix_is_skipped_with_gradients_and_for_vision(tmp_path, tok, folder, yesno):
    r = _text_rerankers(tmp_path, tok)[0]
    r.share_prefix = True
    rec = _rec(folder, {"query": {"text": "a red circle"}, "documents": [{"text": "a red circle"}, {"text": "a blue square"}]})
    sig = r.signals([rec])  # gradients on: a student being trained runs the whole prompt
    assert sig.scores.requires_grad and not r._prefixes
    plain_text = rm.Reranker(r.model, tok, kind="seq_cls")
    plain_text.chat_format = False  # a plain-text cross-encoder prompt: nothing to share
    assert not plain_text.can_share_prefix()
    assert not yesno.can_share_prefix()  # Qwen3-VL (images in the prompt): the plain forward
