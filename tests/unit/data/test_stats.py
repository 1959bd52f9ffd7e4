"""Data statistics and the warnings `data check` prints."""

import json

from PIL import Image

from mmdistill.data.records import read_records
from mmdistill.data.stats import file_stats, shared_records, stats_warnings


def write(folder, name, rows):
    (folder / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return read_records(folder / name)[0]


def test_pair_stats_count_distinct_texts_images_and_labels(tmp_path):
    for i in range(4):
        Image.new("RGB", (8 + i, 8), "red").save(tmp_path / f"{i}.png")
    rows = [{"image": f"{i % 4}.png", "text": f"A  digit {'one' if i < 10 else 'two'}", "meta": {"label": "one" if i < 10 else "two"}} for i in range(11)]
    stats = file_stats(write(tmp_path, "p.jsonl", rows))
    assert stats["records"] == 11 and stats["distinct_images"] == 4 and stats["duplicate_images"] == 4
    assert stats["distinct_texts"] == 2  # case and spaces folded: "A  digit one" == "a digit one"
    assert stats["text_words"] == {"min": 3, "mean": 3.0, "max": 3}
    assert stats["image_sizes"] == {"8x8": 1, "9x8": 1, "10x8": 1, "11x8": 1}
    assert stats["labels"] == {"one": 10, "two": 1}
    warnings = stats_warnings(stats)
    assert any(w.startswith("2 distinct captions over 11 pairs") and "image→text R@1" in w for w in warnings)
    assert any("7 pairs reuse an image" in w for w in warnings)
    assert any("labels are imbalanced (10 vs 1" in w for w in warnings)


def test_distinct_captions_raise_no_warning(tmp_path):
    Image.new("RGB", (8, 8), "red").save(tmp_path / "a.png")
    Image.new("RGB", (8, 8), "blue").save(tmp_path / "b.png")
    stats = file_stats(write(tmp_path, "p.jsonl", [{"image": "a.png", "text": "red"}, {"image": "b.png", "text": "blue"}]))
    assert stats_warnings(stats) == []


def test_rerank_and_chat_stats(tmp_path):
    Image.new("RGB", (8, 8), "red").save(tmp_path / "a.png")
    rr = [{"query": {"text": "red"}, "documents": [{"image": "a.png"}, {"text": "blue"}], "labels": [1, 0]}, {"query": {"image": "a.png"}, "documents": [{"text": "red"}]}]
    stats = file_stats(write(tmp_path, "r.jsonl", rr))
    assert stats["documents_per_query"] == {"min": 1, "mean": 1.5, "max": 2}
    assert stats["labelled_queries"] == 1 and stats["label_values"] == {"0": 1, "1": 1}
    chat = [{"image": "a.png", "prompt": "Colour?", "response": "red", "skills": ["colour"]}, {"image": "a.png", "prompt": "colour? ", "response": "a red thing"}]
    stats = file_stats(write(tmp_path, "c.jsonl", chat))
    assert stats["distinct_prompts"] == 1 and stats["distinct_images"] == 1
    assert stats["response_words"] == {"min": 1, "mean": 2.0, "max": 3} and stats["skills"] == {"colour": 1}


def test_shared_records_find_leakage(tmp_path):
    Image.new("RGB", (8, 8), "red").save(tmp_path / "a.png")
    Image.new("RGB", (8, 8), "blue").save(tmp_path / "b.png")
    train = write(tmp_path, "t.jsonl", [{"image": "a.png", "text": "red"}, {"image": "b.png", "text": "blue"}])
    val = write(tmp_path, "v.jsonl", [{"image": "b.png", "text": "Blue"}, {"image": "a.png", "text": "blue"}])
    assert [r.line for r in shared_records(train, val)] == [1]  # same image and caption; the other pairs a with "blue"
