"""`data import`: LLaVA conversations, Parquet / Arrow files and datasets folders become records `data check` passes."""

import io
import json

import datasets
import pytest
from PIL import Image

from mmdistill.data.convert import import_data
from mmdistill.data.records import RecordError, check_file, read_records


def png(color, size=(8, 8)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def test_llava_conversations_become_chat_records(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs/a.png").write_bytes(png("red"))
    (tmp_path / "imgs/b.png").write_bytes(png("blue"))
    items = [
        {"id": "x1", "image": "imgs/a.png", "conversations": [{"from": "human", "value": "<image>\nWhat colour is it?"}, {"from": "gpt", "value": "Red."},
                                                               {"from": "human", "value": "Sure?"}, {"from": "gpt", "value": "Yes."}]},
        {"image": ["imgs/a.png", "imgs/b.png"], "conversations": [{"from": "human", "value": "<image> and <image>: same?"}, {"from": "gpt", "value": "No."}]},
        {"image": "imgs/missing.png", "conversations": [{"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "A"}]},
        {"image": "imgs/a.png", "conversations": [{"from": "gpt", "value": "A"}, {"from": "human", "value": "Q"}]},
        {"image": ["imgs/a.png"], "conversations": [{"from": "human", "value": "<image><image> Q"}, {"from": "gpt", "value": "A"}]},
    ]
    (tmp_path / "llava.json").write_text(json.dumps(items))
    res = import_data(tmp_path / "llava.json", tmp_path / "out")
    assert res["written"] == 2 and res["rejected"] == 3 and res["later_turns_dropped"] == 1 and res["kind"] == "chat"
    recs, _ = read_records(tmp_path / "out/train.jsonl")
    assert (recs[0].prompt, recs[0].response, recs[0].id) == ("What colour is it?", "Red.", "x1")
    assert recs[1].images and len(recs[1].images) == 2 and recs[1].prompt == "and : same?"
    assert recs[0].image == recs[1].images[0]  # the same image stored once, named by its content
    assert check_file(tmp_path / "out/train.jsonl", decode_images=True) == []
    rejected = [json.loads(line) for line in (tmp_path / "out/train.rejected.jsonl").read_text().splitlines()]
    assert [r["line"] for r in rejected] == [3, 4, 5]
    assert "image file not found" in rejected[0]["error"] and "human turn then a gpt turn" in rejected[1]["error"] and "2 <image> placeholders for 1 images" in rejected[2]["error"]
    with pytest.raises(RecordError, match=r"llava.json:3: image: .*image file not found"):
        import_data(tmp_path / "llava.json", tmp_path / "out2", on_error="fail")


def test_parquet_and_datasets_folder_with_a_column_map(tmp_path):
    ds = datasets.Dataset.from_dict({"jpg": [{"bytes": png("red"), "path": None}, {"bytes": png("green"), "path": None}, {"bytes": b"nope", "path": None}],
                                     "caption": ["a red square", "a green square", "broken"]})
    ds.to_parquet(str(tmp_path / "d.parquet"))
    res = import_data(tmp_path / "d.parquet", tmp_path / "p", fields={"image": "jpg", "text": "caption"})
    assert (res["format"], res["kind"], res["written"], res["rejected"]) == ("parquet", "pair", 2, 1)
    recs, _ = read_records(tmp_path / "p/train.jsonl")
    assert [r.text for r in recs] == ["a red square", "a green square"]
    assert recs[0].load_image().getpixel((0, 0)) == (255, 0, 0)
    splits = datasets.DatasetDict({"train": ds.cast_column("jpg", datasets.Image()).select([0, 1]), "validation": ds.cast_column("jpg", datasets.Image()).select([1])})
    splits.save_to_disk(str(tmp_path / "hf"))
    with pytest.raises(RecordError, match="holds splits .*choose one with --split"):
        import_data(tmp_path / "hf", tmp_path / "h", fields={"image": "jpg", "text": "caption"})
    res = import_data(tmp_path / "hf", tmp_path / "h", fields={"image": "jpg", "text": "caption"}, split="validation", name="val")
    assert res["format"] == "hf" and res["written"] == 1 and (tmp_path / "h/val.jsonl").is_file()
    with pytest.raises(RecordError, match=r"column\(s\) not found: text=text \(columns: jpg, caption\)"):
        import_data(tmp_path / "d.parquet", tmp_path / "q", fields={"image": "jpg"})
