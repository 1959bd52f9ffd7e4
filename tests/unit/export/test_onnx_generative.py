"""ONNX export of the generative chat path: tiny Qwen3-VL, Qwen3-VL-MoE and Qwen2.5-VL (vision encoder + decoder with
KV cache), a tiny Qwen3-Omni thinker (+ audio encoder) and a tiny text-only Qwen3 causal LM exported with torch.onnx (dynamo), run by the greedy ORT runner and compared with eager
`generate` on prompts the export never saw (other lengths, several images in one prompt, a left-padded batch);
and the one-line errors for architectures the export does not cover."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from mmdistill.data import synth
from mmdistill.export import onnx as ox
from mmdistill.export import onnx_generative as og
from mmdistill.models.generative import load_vlm
from mmdistill.models.tiny import build_tiny_lm, build_tiny_vlm, train_qwen_tokenizer

# the tiny models' text: ShapesWorld questions and answers
TEXTS = [f"{q['prompt']} {q['response']}" for i in range(40) for q in synth.questions(synth.scene_for_index(0, i))]
# random weights at the default init (std 0.02) make a tiny decoder repeat one token whatever the prompt; a wider
# init gives greedy sequences that change with the prompt and the image, so "same tokens" means something
WIDE = {"text_config.initializer_range": 0.2}


@pytest.fixture(scope="module")
def tok():
    return train_qwen_tokenizer(TEXTS, vocab_size=400)


def _chat_file(d, n=3):
    """Held-out chat records with images on disk (scenes the tokenizer's text did not come from)."""
    lines = []
    for i in range(n):
        scene = synth.scene_for_index(5, 500 + i)
        synth.render(scene, size=64).save(d / f"{i}.png")
        q = synth.questions(scene)[i % 2]
        lines.append(json.dumps({"image": f"{i}.png", "prompt": q["prompt"], "response": q["response"], "skills": [q["skill"]]}))
    path = d / "chat.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def vlm(tmp_path_factory, tok):
    d = tmp_path_factory.mktemp("vlm")
    build_tiny_vlm(d / "model", TEXTS, preset="vlm-nano", tokenizer=tok, overrides=WIDE)
    manifest = ox.export_onnx(d / "model", d / "onnx", data=_chat_file(d), gen_steps=6, log=lambda *_: None)
    model, proc = load_vlm(str(d / "model"))
    return d, model.eval(), proc, manifest


def _encode(proc, prompts, images_per_prompt):
    texts = [proc.apply_chat_template(og._messages(p, len(ims)), add_generation_prompt=True, tokenize=False) for p, ims in zip(prompts, images_per_prompt)]
    flat = [im for ims in images_per_prompt for im in ims]
    enc = proc(text=texts, images=flat or None, return_tensors="pt", padding=True, padding_side="left")
    return {k: v for k, v in enc.items() if isinstance(v, torch.Tensor)}


def _check(runner, model, enc, steps, pad):
    """Greedy tokens identical to eager generate; prefill (step 0) and cached-step logits within 1e-4."""
    want_ids, want_logits = og.eager_generate(model, enc, steps, [], pad)
    got_ids, got_logits = runner.generate(enc, steps, eos_ids=[], return_logits=True)
    assert got_ids.shape == tuple(want_ids.shape) == (enc["input_ids"].shape[0], steps)
    assert np.array_equal(got_ids, want_ids.numpy())
    assert len(got_logits) == steps
    for g, w in zip(got_logits, want_logits):
        assert np.abs(g - w.numpy()).max() <= 1e-4
    return want_ids


def test_vlm_export_writes_both_graphs_and_the_manifest_says_how_to_feed_them(vlm):
    d, model, _, manifest = vlm
    assert manifest["task"] == "generate" and manifest["kind"] == "qwen3_vl" and manifest["family"] == "generative"
    assert set(manifest["graphs"]) == {"vision_encoder", "decoder"}
    dec = manifest["graphs"]["decoder"]
    names = [i["name"] for i in dec["inputs"]]
    assert names[:6] == ["input_ids", "vision_embeds", "vision_mask", "deepstack_embeds", "position_ids", "attention_mask"]
    assert names[6:] == [f"past_{k}_{i}" for i in range(manifest["num_layers"]) for k in ("key", "value")]
    pos = dec["inputs"][4]["shape"]
    assert pos == [4, "batch", "sequence"]
    assert dec["inputs"][6]["shape"][2] == "past" and dec["outputs"][0]["shape"] == ["batch", manifest["vocab_size"]]
    assert [o["name"] for o in dec["outputs"][1:]] == [f"present_{k}_{i}" for i in range(manifest["num_layers"]) for k in ("key", "value")]
    vis = manifest["graphs"]["vision_encoder"]
    assert [i["name"] for i in vis["inputs"]] == ["pixel_values", "interp_indices", "interp_weights", "rotary_pos_ids", "cu_seqlens"]
    assert not list((d / "onnx").glob("*.safetensors"))
    # parity recorded at export time, on the held-out records
    par = manifest["parity"]
    assert "chat.jsonl" in par["inputs"] and par["steps"] == 6
    fp = par["fp32"]
    assert fp["tokens_identical_all"] and fp["tokens_identical"] == "3/3"
    assert fp["prefill_logits_max_abs_diff"] <= 1e-4 and fp["step_logits_max_abs_diff"] <= 1e-4
    assert fp["metric"]["name"] == "vqa_accuracy" and fp["metric"]["onnx"] == pytest.approx(fp["metric"]["eager"])
    lat = manifest["latency"]
    assert lat["eager_ms_per_token"] > 0 and lat["fp32_ms_per_token"] > 0 and lat["tokens_per_prompt"] == 6


def test_vlm_onnx_greedy_matches_eager_generate_on_new_prompts(vlm):
    d, model, proc, _ = vlm
    runner, _, _ = ox.load_onnx(d / "onnx")
    pad = proc.tokenizer.pad_token_id
    rng = np.random.default_rng(3)
    img = lambda: Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))  # noqa: E731
    seqs = []
    # one image; two images in one prompt (two grids packed in one vision call); a text-only prompt
    for prompt, ims in [("What colour is the circle?", [img()]), ("Describe the image. Is the red square left of the blue circle?", [img(), img()]), ("How many coloured shapes are there?", [])]:
        seqs.append(_check(runner, model, _encode(proc, [prompt], [ims]), 5, pad)[0].tolist())
    # a left-padded batch of two prompts of different lengths
    _check(runner, model, _encode(proc, ["Where is the red circle?", "Describe the image."], [[img()], [img()]]), 4, pad)
    # the greedy sequences depend on the prompt (a graph that ignored its inputs would not match eager by luck)
    assert len({tuple(s) for s in seqs}) == 3 and any(len(set(s)) > 1 for s in seqs)


def test_vision_graph_matches_the_towers_features(vlm):
    d, model, proc, _ = vlm
    runner, _, _ = ox.load_onnx(d / "onnx")
    ims = [synth.render(synth.scene_for_index(9, i), size=64) for i in range(3)]
    enc = proc.image_processor(images=ims, return_tensors="pt")
    with torch.no_grad():
        ref = model.model.get_image_features(enc["pixel_values"], enc["image_grid_thw"], return_dict=True)
    emb, ds = runner.image_features(enc["pixel_values"], enc["image_grid_thw"])
    assert np.abs(emb - torch.cat(ref.pooler_output).numpy()).max() <= 1e-4
    assert np.abs(ds - torch.stack([torch.cat(f) for f in ref.deepstack_features]).numpy()).max() <= 1e-4
    # each image attends to itself only: the first image's features do not change when others are packed beside it
    alone = proc.image_processor(images=ims[:1], return_tensors="pt")
    emb1, _ = runner.image_features(alone["pixel_values"], alone["image_grid_thw"])
    assert np.abs(emb[: emb1.shape[0]] - emb1).max() <= 1e-5


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    d = tmp_path_factory.mktemp("lm")
    # its own tokenizer: the VLM's processor marked the shared one as a Qwen3-VL processor's (processor_class)
    build_tiny_lm(d / "model", TEXTS, preset="vlm-nano", vocab_size=400, overrides={"initializer_range": 0.2})
    # through the CLI: what it prints is the manifest's parity
    p = subprocess.run([sys.executable, "-m", "mmdistill.cli", "export", str(d / "model"), "--out", str(d / "onnx"), "--int8", "--steps", "5"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    manifest = ox.read_manifest(d / "onnx")
    assert f"fp32: greedy tokens identical {manifest['parity']['fp32']['tokens_identical']} over 5 steps" in p.stdout
    assert "latency per generated token" in p.stdout and "decoder.onnx" in p.stdout and "decoder.int8.onnx" in p.stdout
    model, tokenizer = load_vlm(str(d / "model"))
    return d, model.eval(), tokenizer, manifest


def test_causal_lm_export_and_greedy_parity(lm):
    d, model, tokenizer, manifest = lm
    assert manifest["kind"] == "causal_lm" and list(manifest["graphs"]) == ["decoder"]
    assert [i["name"] for i in manifest["graphs"]["decoder"]["inputs"]][:3] == ["input_ids", "position_ids", "attention_mask"]
    fp = manifest["parity"]["fp32"]
    assert "generated" in manifest["parity"]["inputs"] and fp["tokens_identical_all"]
    assert fp["prefill_logits_max_abs_diff"] <= 1e-4 and fp["step_logits_max_abs_diff"] <= 1e-4
    # int8: a different graph (logits differ), recorded beside fp32
    assert 0 < manifest["parity"]["int8"]["prefill_logits_max_abs_diff"] < 1.0
    runner, _, _ = ox.load_onnx(d / "onnx")
    for prompts in (["What shape is at the top left?"], ["Is the red circle small or large?", "Describe the image."]):
        texts = [tokenizer.apply_chat_template(og._messages(p, 0), add_generation_prompt=True, tokenize=False) for p in prompts]
        enc = dict(tokenizer(texts, return_tensors="pt", padding=True, padding_side="left"))
        _check(runner, model, enc, 6, tokenizer.pad_token_id)
    # with the stop tokens on, the runner stops where generate stops
    enc = dict(tokenizer([texts[0]], return_tensors="pt"))
    want, _ = og.eager_generate(model, enc, 20, manifest["eos_token_ids"], tokenizer.pad_token_id)
    assert np.array_equal(runner.generate(enc, 20), want.numpy())


@pytest.fixture(scope="module")
def q25(tmp_path_factory):
    d = tmp_path_factory.mktemp("q25")
    # two vision blocks: the first windowed, the second full attention (what fullatt_block_indexes says)
    over = {"text_config.initializer_range": 0.2, "vision_config.depth": 2, "vision_config.fullatt_block_indexes": [1]}
    build_tiny_vlm(d / "model", TEXTS, kind="qwen2_5_vl", preset="vlm-nano", vocab_size=400, overrides=over)
    manifest = ox.export_onnx(d / "model", d / "onnx", gen_steps=5, log=lambda *_: None)
    model, proc = load_vlm(str(d / "model"))
    return d, model.eval(), proc, manifest


def test_qwen25_vl_exports_with_its_window_attention(q25):
    d, model, proc, manifest = q25
    assert manifest["kind"] == "qwen2_5_vl" and "deepstack_embeds" not in [i["name"] for i in manifest["graphs"]["decoder"]["inputs"]]
    assert [i["name"] for i in manifest["graphs"]["vision_encoder"]["inputs"]] == ["pixel_values", "rotary_pos_ids", "cu_seqlens", "window_index", "cu_window_seqlens"]
    fp = manifest["parity"]["fp32"]
    assert fp["tokens_identical_all"] and fp["prefill_logits_max_abs_diff"] <= 1e-4 and fp["step_logits_max_abs_diff"] <= 1e-4
    runner, _, _ = ox.load_onnx(d / "onnx")
    # grids of several windows (8x8 patches: 2x2 windows; 2x6 and 12x4: windows cut at the edges), packed
    vc = model.config.vision_config
    grid = torch.tensor([[1, 8, 8], [1, 2, 6], [1, 12, 4]])
    pv = torch.randn(int(grid.prod(-1).sum()), vc.in_channels * vc.temporal_patch_size * vc.patch_size**2, generator=torch.Generator().manual_seed(0))
    assert len(og.vision_inputs(model.config, grid)["cu_window_seqlens"]) > 4
    with torch.no_grad():
        want = torch.cat(model.model.get_image_features(pv, grid, return_dict=True).pooler_output)
    got, deep = runner.image_features(pv, grid)
    assert deep is None and np.abs(got - want.numpy()).max() <= 1e-4
    img = synth.render(synth.scene_for_index(4, 4), size=64)
    _check(runner, model, _encode(proc, ["What shape is at the top left?"], [[img]]), 5, proc.tokenizer.pad_token_id)


def test_moe_vlm_exports_through_batched_experts(tmp_path):
    """Qwen3-VL-MoE: transformers' default grouped_mm experts have no ONNX lowering; the export switches the model to
    its batched_mm experts and back, and the graphs still match eager (grouped_mm) generate."""
    build_tiny_vlm(tmp_path / "model", TEXTS, kind="qwen3_vl_moe", preset="vlm-nano", vocab_size=400, overrides=WIDE)
    manifest = ox.export_onnx(tmp_path / "model", tmp_path / "onnx", data=_chat_file(tmp_path, n=2), gen_steps=4, log=lambda *_: None)
    assert manifest["kind"] == "qwen3_vl" and manifest["experts"] == "batched_mm in the graph (eager runs grouped_mm)"
    fp = manifest["parity"]["fp32"]
    assert fp["tokens_identical"] == "2/2" and fp["prefill_logits_max_abs_diff"] <= 1e-4 and fp["step_logits_max_abs_diff"] <= 1e-4
    model, _ = load_vlm(str(tmp_path / "model"))
    assert model.config._experts_implementation == "grouped_mm"


def test_architectures_it_cannot_export_give_one_line_errors(tmp_path):
    from transformers import Qwen2VLConfig, Qwen3OmniMoeConfig

    Qwen3OmniMoeConfig(architectures=["Qwen3OmniMoeForConditionalGeneration"]).save_pretrained(tmp_path / "full_omni")  # thinker + talker
    Qwen2VLConfig(architectures=["Qwen2VLForConditionalGeneration"]).save_pretrained(tmp_path / "q2vl")
    for name, why in (("full_omni", r"full Qwen3-Omni model.*save its thinker alone"), ("q2vl", r"Qwen2-VL is not exported")):
        with pytest.raises(ox.ExportError, match=why) as e:
            ox.export_onnx(tmp_path / name, tmp_path / f"{name}.onnx", task="generate", log=lambda *_: None)
        assert "\n" not in str(e.value) and str(tmp_path / name) in str(e.value)
        assert not (tmp_path / f"{name}.onnx").exists()  # refused before anything is written
    p = subprocess.run([sys.executable, "-m", "mmdistill.cli", "export", str(tmp_path / "full_omni"), "--task", "generate", "--out", str(tmp_path / "o3")], capture_output=True, text=True)
    assert p.returncode == 2 and p.stderr.startswith("error: ") and "thinker" in p.stderr and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


# ---------------------------------------------------------------------------------------------
# The Qwen3-Omni thinker: audio graph beside the vision graph and the decoder


def _tone(seconds: float, seed: int, rate: int = 16000) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(rate * seconds)) / rate
    return (sum(np.sin(2 * np.pi * f * t) for f in rng.uniform(200, 3000, 3)) * 0.1 + rng.normal(0, 0.01, t.shape)).astype(np.float32)


def _omni_chat_file(d):
    """Held-out chat records with audio on disk: a clip alone, a clip with an image, an image alone."""
    import wave

    (d / "clips").mkdir()
    lines = []
    for i, (secs, with_image, with_audio) in enumerate([(1.3, False, True), (2.6, True, True), (0.0, True, False)]):
        scene = synth.scene_for_index(6, 600 + i)
        q = synth.questions(scene)[0]
        rec = {"prompt": q["prompt"], "response": q["response"], "skills": [q["skill"]]}
        if with_audio:
            with wave.open(str(d / "clips" / f"{i}.wav"), "wb") as w:
                w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
                w.writeframes((_tone(secs, i) * 32767).astype(np.int16).tobytes())
            rec["audio"] = f"clips/{i}.wav"
        if with_image:
            synth.render(scene, size=64).save(d / f"{i}.png")
            rec["image"] = f"{i}.png"
        lines.append(json.dumps(rec))
    (d / "chat.jsonl").write_text("\n".join(lines) + "\n")
    return d / "chat.jsonl"


@pytest.fixture(scope="module")
def omni(tmp_path_factory, tok):
    d = tmp_path_factory.mktemp("omni")
    build_tiny_vlm(d / "model", TEXTS, kind="qwen3_omni_thinker", preset="vlm-nano", tokenizer=tok, overrides=WIDE | {"audio_config.initializer_range": 0.2})
    manifest = ox.export_onnx(d / "model", d / "onnx", data=_omni_chat_file(d), gen_steps=6, log=lambda *_: None)
    model, proc = load_vlm(str(d / "model"))
    runner, _, _ = ox.load_onnx(d / "onnx")
    return d, model.eval(), proc, manifest, runner


def test_omni_thinker_exports_three_graphs_and_its_parity_covers_audio_records(omni):
    d, _, _, manifest, _ = omni
    assert manifest["kind"] == "qwen3_omni" and set(manifest["graphs"]) == {"vision_encoder", "audio_encoder", "decoder"}
    assert (d / "onnx" / "audio_encoder.onnx").is_file() and manifest["audio_token_id"] > 0
    assert manifest["experts"].startswith("batched_mm")  # the thinker's text model is a MoE
    fp = manifest["parity"]["fp32"]
    assert "chat.jsonl (3 records)" in manifest["parity"]["inputs"]
    assert fp["tokens_identical"] == "3/3" and fp["prefill_logits_max_abs_diff"] <= 1e-4 and fp["step_logits_max_abs_diff"] <= 1e-4
    assert manifest["latency"]["fp32_ms_per_token"] > 0


def test_omni_onnx_greedy_matches_eager_on_new_clips_images_and_a_padded_batch(omni):
    _, model, proc, _, runner = omni
    pad = proc.tokenizer.pad_token_id
    img = synth.render(synth.scene_for_index(9, 3), size=64)
    # two clips and an image in one prompt; a 4-chunk clip; a clip shorter than one chunk
    for images, clips in (([img], [_tone(0.7, 1), _tone(1.9, 2)]), ([], [_tone(3.4, 3)]), ([img], [_tone(0.25, 4)])):
        enc = runner.encode(og._messages("What do you hear?", len(images), len(clips)), images, clips)
        _check(runner, model, enc, 5, pad)
    # a left-padded batch of two prompts, clips of different lengths (what the Omni processor pads)
    texts = [proc.apply_chat_template(og._messages(p, 0, 1), add_generation_prompt=True, tokenize=False) for p in ("Transcribe the audio.", "What is said?")]
    enc = proc(text=texts, audio=[_tone(0.5, 5), _tone(2.2, 6)], sampling_rate=16000, return_tensors="pt", padding=True, padding_side="left")
    enc = {k: v for k, v in enc.items() if isinstance(v, torch.Tensor)}
    assert int(enc["attention_mask"].eq(0).sum()) > 0
    _check(runner, model, enc, 4, pad)


def test_omni_audio_graph_matches_the_tower_and_the_audio_reaches_the_logits(omni):
    _, model, proc, _, runner = omni
    fe = proc.feature_extractor
    for clips in ([_tone(0.4, 7)], [_tone(3.1, 8), _tone(1.0, 9)]):  # one chunk and one window; several of both, packed
        f = fe(clips, sampling_rate=16000, return_attention_mask=True, padding=True, return_tensors="pt")
        with torch.no_grad():
            want = model.model.get_audio_features(f["input_features"], f["attention_mask"]).last_hidden_state
        got = runner.audio_features(f["input_features"], f["attention_mask"])
        assert got.shape == tuple(want.shape) and np.abs(got - want.numpy()).max() <= 1e-5
    # another clip of the same length changes the prefill logits, in eager and in the graphs alike
    logits = []
    for seed in (10, 11):
        enc = runner.encode(og._messages("Transcribe the audio.", 0, 1), [], [_tone(1.2, seed)])
        _, got = runner.generate(enc, 1, eos_ids=[], return_logits=True)
        _, want = og.eager_generate(model, enc, 1, [], proc.tokenizer.pad_token_id)
        assert np.abs(got[0] - want[0].numpy()).max() <= 1e-4
        logits.append(got[0])
    assert np.abs(logits[0] - logits[1]).max() > 1e-3


def test_omni_generated_parity_items_and_audio_refused_by_a_model_without_an_audio_graph(omni, vlm, tmp_path):
    d, model, _, _, runner = omni
    items, images, audios = og.generated_omni_chat(3, 0, 64, 16000)
    assert [len(a) for a in audios] == [1, 1, 0] and [len(i) for i in images] == [1, 0, 1]
    parity, _ = og.chat_parity(model, {"fp32": runner}, items, images, steps=3, source="generated", log=lambda *_: None, audios=audios)
    assert parity["fp32"]["tokens_identical"] == "3/3"
    vd = vlm[0]
    vl_runner, _, _ = ox.load_onnx(vd / "onnx")
    with pytest.raises(ValueError, match="no audio graph"):
        vl_runner.encode(og._messages("hi", 0, 1), [], [_tone(0.5, 1)])
    from mmdistill.data.records import RecordError

    with pytest.raises(RecordError, match=r"chat.jsonl.*audio.*takes none"):
        og.read_items(d / "chat.jsonl", 3)


def test_serve_backend_answers_from_the_onnx_export_as_the_torch_backend_does(vlm):
    """`mmdistill serve EXPORT` loads the chat graphs (OnnxChat): same greedy answer and stream as the torch ChatModel."""
    from mmdistill.serve.backends import ChatModel, OnnxChat, load_backend

    d, _, _, _ = vlm
    onnx_chat = load_backend(d / "onnx")
    torch_chat = load_backend(d / "model")
    assert isinstance(onnx_chat, OnnxChat) and onnx_chat.backend == "onnx" and isinstance(torch_chat, ChatModel)
    assert onnx_chat.context == torch_chat.context and set(onnx_chat._eos) == set(torch_chat._eos)
    image = synth.render(synth.scene_for_index(21, 3), size=64)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the square?"}]}]
    inputs = onnx_chat.encode(messages, [image])
    assert torch.equal(inputs["input_ids"], torch_chat.encode(messages, [image])["input_ids"])
    want = torch_chat.generate(inputs, 12)
    got = onnx_chat.generate(inputs, 12)
    assert got == want and got[1] >= 1
    pieces = list(onnx_chat.stream(inputs, 12))
    assert "".join(p for p in pieces if isinstance(p, str)) == want[0] and pieces[-1] == (want[1], want[2])
    # sampling runs too (temperature > 0): tokens from the vocabulary, no more than asked
    text, n, _ = onnx_chat.generate(inputs, 5, temperature=1.0)
    assert isinstance(text, str) and 1 <= n <= 5


def test_serve_backend_hears_audio_from_the_omni_export_as_the_torch_backend_does(omni):
    from mmdistill.serve.backends import ChatModel, OnnxChat, load_backend

    d, _, _, _, _ = omni
    onnx_chat, torch_chat = load_backend(d / "onnx"), load_backend(d / "model")
    assert isinstance(onnx_chat, OnnxChat) and isinstance(torch_chat, ChatModel)
    assert onnx_chat.audio_rate == torch_chat.audio_rate == 16000
    img = synth.render(synth.scene_for_index(21, 4), size=64)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "audio"}, {"type": "text", "text": "What is said?"}]}]
    clips = [_tone(1.6, 12)]
    inputs = onnx_chat.encode(messages, [img], clips)
    ref = torch_chat.encode(messages, [img], clips)
    assert torch.equal(inputs["input_ids"], ref["input_ids"]) and torch.allclose(inputs["input_features"], ref["input_features"])
    assert onnx_chat.generate(inputs, 8) == torch_chat.generate(ref, 8)
