"""JSONL records: every bad line is reported with its file, line, field and reason."""

import json
import pickle

import pytest
from PIL import Image

from mmdistill.data.records import (
    DEFAULT_INSTRUCTION,
    ChatRecord,
    PairRecord,
    RecordError,
    RerankRecord,
    check_file,
    detect_kind,
    parse_record,
    read_records,
)

PAIR = {"image": "a.png", "text": "a red circle"}
RERANK = {
    "query": {"text": "red circle"},
    "documents": [{"image": "a.png"}, {"text": "a blue square"}, {"text": "red", "image": "b.png"}],
    "labels": [2, 0, 1.5],
}
CHAT = {"image": "a.png", "prompt": "What colour?", "response": "red", "skills": ["colour"], "difficulty": "easy"}


@pytest.fixture
def folder(tmp_path):
    Image.new("RGB", (8, 8), "red").save(tmp_path / "a.png")
    Image.new("RGB", (8, 8), "blue").save(tmp_path / "b.png")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (tmp_path.parent / "secret.png").write_bytes((tmp_path / "a.png").read_bytes())
    return tmp_path


def write(folder, *rows, name="data.jsonl"):
    """Rows are dicts (dumped as JSON) or raw strings (written as they are)."""
    path = folder / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def first_error(path, **kw) -> RecordError:
    with pytest.raises(RecordError) as info:
        read_records(path, **kw)
    return info.value


# ----------------------------------------------------------------- valid records


def test_reads_all_three_kinds(folder):
    pairs, errors = read_records(write(folder, PAIR, {**PAIR, "id": 7, "meta": {"src": "x"}}))
    assert errors == [] and [type(r) for r in pairs] == [PairRecord, PairRecord]
    assert pairs[1].id == 7 and pairs[1].meta == {"src": "x"}

    (rerank,), _ = read_records(write(folder, RERANK, name="r.jsonl"))
    assert isinstance(rerank, RerankRecord)
    assert rerank.instruction == DEFAULT_INSTRUCTION and rerank.labels == [2, 0, 1.5]

    chats, _ = read_records(write(folder, CHAT, {"images": ["a.png", "b.png"], "prompt": "Compare."}, name="c.jsonl"))
    assert all(isinstance(c, ChatRecord) for c in chats)
    assert [c.image_list for c in chats] == [["a.png"], ["a.png", "b.png"]]
    assert chats[0].difficulty == "easy" and chats[1].response is None


def test_records_know_line_and_folder_and_load_images(folder):
    path = write(folder, "", PAIR, "   ", {**PAIR, "image": "b.png"})
    records, _ = read_records(path)
    assert [r.line for r in records] == [2, 4]
    assert records[0].base_dir == folder.resolve()
    assert records[1].load_image().getpixel((0, 0)) == (0, 0, 255)

    (rerank,), _ = read_records(write(folder, RERANK, name="r.jsonl"))
    assert rerank.load_query_image() is None
    images = rerank.load_document_images()
    assert images[1] is None and images[0].size == (8, 8)

    (chat,), _ = read_records(write(folder, {"images": ["a.png", "b.png"], "prompt": "Compare."}, name="c.jsonl"))
    assert [im.getpixel((0, 0)) for im in chat.load_images()] == [(255, 0, 0), (0, 0, 255)]


def test_detect_kind():
    assert detect_kind(PAIR) == "pair"
    assert detect_kind(RERANK) == "rerank"
    assert detect_kind(CHAT) == "chat"
    assert detect_kind({"images": ["a.png"], "prompt": "hi"}) == "chat"
    assert detect_kind({"image": "a.png"}) == "pair"  # then "text: missing required field"
    with pytest.raises(ValueError, match="cannot tell the record kind"):
        detect_kind({"foo": 1})


def test_parse_record_for_in_memory_use(folder):
    record = parse_record(PAIR, base_dir=folder)
    assert record.load_image().size == (8, 8)
    with pytest.raises(RecordError, match=r"^<record>:0: text: missing required field$"):
        parse_record({"image": "a.png"})


# ------------------------------------------------------------------- bad records


def test_error_format_is_one_exact_line():
    err = RecordError("d.jsonl", 3, "documents.2.text", "expected a string,\ngot number")
    assert str(err) == "d.jsonl:3: documents.2.text: expected a string, got number"
    assert (err.path, err.line, err.field) == ("d.jsonl", 3, "documents.2.text")
    assert str(pickle.loads(pickle.dumps(err))) == str(err)


def test_malformed_json(folder):
    path = write(folder, PAIR, '{"image": "a.png", "text": ')
    err = first_error(path)
    assert (err.line, err.field) == (2, "json")
    assert str(err).startswith(f"{path}:2: json: invalid JSON")


def test_nan_is_not_json(folder):
    err = first_error(write(folder, '{"image": "a.png", "text": "x", "meta": {"score": NaN}}'))
    assert err.field == "json" and "NaN" in err.message


def test_not_an_object(folder):
    err = first_error(write(folder, "[1, 2]"))
    assert (err.field, err.message) == ("json", "expected a JSON object, got list")


def test_missing_field(folder):
    err = first_error(write(folder, PAIR, {"image": "a.png"}))
    assert (err.line, err.field, err.message) == (2, "text", "missing required field")


def test_wrong_type(folder):
    err = first_error(write(folder, {"image": "a.png", "text": 5}))
    assert (err.field, err.message) == ("text", "expected a string, got number")
    err = first_error(write(folder, {**PAIR, "id": True}))
    assert (err.field, err.message) == ("id", "expected a string or an integer, got boolean")


def test_nested_wrong_type_has_dotted_field(folder):
    bad = {**RERANK, "documents": [{"text": "ok"}, {"text": "ok"}, {"text": ["not", "a", "string"]}]}
    err = first_error(write(folder, bad))
    assert (err.field, err.message) == ("documents.2.text", "expected a string, got list")


def test_labels_must_be_numbers(folder):
    err = first_error(write(folder, {**RERANK, "labels": [1, "2", 0]}))
    assert (err.field, err.message) == ("labels.1", "expected a number, got string")


def test_unknown_field(folder):
    err = first_error(write(folder, {**PAIR, "caption": "x"}))
    assert err.field == "caption" and err.message.startswith("unknown field")
    err = first_error(write(folder, {**RERANK, "documents": [{"text": "a", "score": 1}], "labels": None}))
    assert err.field == "documents.0.score" and err.message.startswith("unknown field")


def test_labels_length_mismatch(folder):
    err = first_error(write(folder, {**RERANK, "labels": [1, 0]}))
    assert err.field == "labels" and "2 labels for 3 documents" in err.message


def test_document_with_neither_text_nor_image(folder):
    err = first_error(write(folder, {**RERANK, "documents": [{"text": "a"}, {}], "labels": None}))
    assert err.field == "documents.1" and "needs" in err.message


def test_query_with_neither_text_nor_image(folder):
    err = first_error(write(folder, {**RERANK, "query": {}}))
    assert err.field == "query"


def test_query_with_no_documents(folder):
    err = first_error(write(folder, {"query": {"text": "q"}, "documents": []}))
    assert (err.field, err.message) == ("documents", "must not be empty")
    err = first_error(write(folder, {"query": {"text": "q"}}))
    assert (err.field, err.message) == ("documents", "missing required field")


def test_chat_rules(folder):
    err = first_error(write(folder, {**CHAT, "prompt": "  "}))
    assert (err.field, err.message) == ("prompt", "must not be empty")
    err = first_error(write(folder, {**CHAT, "response": ""}))
    assert err.field == "response"
    err = first_error(write(folder, {**CHAT, "images": ["a.png"]}))
    assert err.field == "image" and "exactly one" in err.message
    (text_only,), errors = read_records(write(folder, {"prompt": "hi", "response": "yes"}, name="t.jsonl"))
    assert not errors and text_only.image_list == [] and text_only.image_refs() == [] and text_only.load_images() == []


def test_kind_mismatch(folder):
    err = first_error(write(folder, PAIR, CHAT))
    assert (err.line, err.field) == (2, "record") and "chat" in err.message
    err = first_error(write(folder, PAIR), kind="rerank")
    assert err.line == 1 and "pair" in err.message


def test_skip_mode_returns_good_records_and_counts_errors(folder):
    path = write(folder, PAIR, "{oops", {"image": "a.png"}, PAIR, "", {**PAIR, "x": 1}, PAIR)
    records, errors = read_records(path, on_error="skip")
    assert [r.line for r in records] == [1, 4, 7]
    assert [(e.line, e.field) for e in errors] == [(2, "json"), (3, "text"), (6, "x")]


def test_skip_mode_max_errors(folder):
    path = write(folder, PAIR, "{oops", "{oops", "{oops")
    assert len(read_records(path, on_error="skip", max_errors=3)[1]) == 3
    err = first_error(path, on_error="skip", max_errors=2)
    assert err.field == "file" and "more than 2 errors" in err.message


def test_image_escaping_the_folder(folder):
    err = first_error(write(folder, {**PAIR, "image": "../secret.png"}))
    assert err.field == "image" and "escapes the data folder" in err.message
    err = first_error(
        write(
            folder,
            {**RERANK, "documents": [{"text": "a"}, {"image": str(folder.parent / "secret.png")}], "labels": None},
        )
    )
    assert err.field == "documents.1.image" and "escapes" in err.message


def test_missing_image(folder):
    err = first_error(write(folder, PAIR, {**PAIR, "image": "nope.png"}))
    assert str(err) == f"{folder / 'data.jsonl'}:2: image: 'nope.png': file not found"
    err = first_error(write(folder, {"images": ["a.png", "nope.png"], "prompt": "hi"}))
    assert err.field == "images.1"


def test_check_images_off_skips_the_file_system(folder):
    records, _ = read_records(write(folder, {**PAIR, "image": "nope.png"}), check_images=False)
    assert len(records) == 1


def test_empty_file(folder):
    err = first_error(write(folder))
    assert (err.line, err.field) == (0, "file") and "no records" in err.message
    err = first_error(write(folder, "", "  "))
    assert "no records" in err.message


def test_all_lines_bad_in_skip_mode(folder):
    err = first_error(write(folder, "{oops", "{oops"), on_error="skip")
    assert (err.line, err.field) == (0, "file") and "no valid records" in err.message


def test_missing_file(folder):
    err = first_error(folder / "nope.jsonl")
    assert str(err) == f"{folder / 'nope.jsonl'}:0: file: file not found"


def test_check_file_lists_everything_and_decodes_images_on_request(folder):
    bad_doc = {**RERANK, "documents": [{"text": "a"}, {"image": "corrupt.png"}], "labels": [1, 0]}
    path = write(folder, RERANK, "{oops", bad_doc, {**RERANK, "labels": [1]})
    assert [(e.line, e.field) for e in check_file(path)] == [(2, "json"), (4, "labels")]
    errors = check_file(path, decode_images=True)
    assert [(e.line, e.field) for e in errors] == [(2, "json"), (3, "documents.1.image"), (4, "labels")]
    assert "corrupt" in errors[1].message


def test_check_file_file_level_problems(folder):
    assert [e.message for e in check_file(folder / "nope.jsonl")] == ["file not found"]
    assert [e.field for e in check_file(write(folder, "{oops"))] == ["json", "file"]
    assert check_file(write(folder, PAIR)) == []


# ----------------------------------------------------------------- lazy (streaming) reading


def test_lazy_records_equal_eager_ones_and_keep_only_offsets(folder):
    rows = [PAIR, "", "{not json", {"image": "missing.png", "text": "x"}, {**PAIR, "text": "été, 2"}, {**PAIR, "text": "three"}]
    path = write(folder, *rows)
    eager, e_err = read_records(path, "pair", on_error="skip")
    lazy, l_err = read_records(path, "pair", on_error="skip", lazy=True)
    assert [str(e) for e in l_err] == [str(e) for e in e_err] and len(l_err) == 2
    assert len(lazy) == len(eager) == 3
    assert [(r.line, r.text, r.image) for r in lazy] == [(r.line, r.text, r.image) for r in eager] == [(1, "a red circle", "a.png"), (5, "été, 2", "a.png"), (6, "three", "a.png")]
    assert lazy.spans.nbytes == 3 * 3 * 8  # offsets, lengths, lines: nothing else kept per record
    assert lazy[2].load_image().size == (8, 8)
    assert [r.line for r in lazy[1:]] == [5, 6] and [r.line for r in lazy.take([2, 0])] == [6, 1]
    again = pickle.loads(pickle.dumps(lazy))
    assert again[1].text == "été, 2"
    with pytest.raises(RecordError, match=r"data.jsonl:3: json: invalid JSON"):
        read_records(path, "pair", lazy=True)


def test_lazy_record_whose_line_changed_since_it_was_read(folder):
    path = write(folder, PAIR, {**PAIR, "text": "b"})
    lazy, _ = read_records(path, "pair", lazy=True)
    path.write_text(json.dumps(PAIR) + "\n" + '{"image": "a.png", "txt": "b"}\n')
    with pytest.raises(RecordError, match=r"data.jsonl:2: .*changed since it was read"):
        lazy[1]
