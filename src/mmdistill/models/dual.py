"""Heterogeneous dual-encoder students: a timm image tower + a small text tower with its own tokenizer.

The student is a ``transformers.VisionTextDualEncoderModel`` whose vision tower is a
``TimmWrapperModel`` (any ``timm`` architecture by name, built locally with ``pretrained=False``)
and whose text tower is a tiny ``CLIPTextModel`` (default: pre-LN, pooled at the tokenizer's end
token) or ``BertModel`` (pooled by BERT's [CLS] pooler; see ``_text_config`` for why it is not the
default); each tower's
pooled output goes through a linear projection (no bias) to a shared ``projection_dim``, and a
learnable ``logit_scale`` sits beside them. Its processor is a ``VisionTextDualEncoderProcessor``
(a CLIP image processor + a WordPiece tokenizer trained here on the training texts).

Why this format: it is the ecosystem's own. ``VisionTextDualEncoderModel`` builds its towers with
``AutoModel.from_config``, and transformers maps ``model_type: timm_wrapper`` to
``TimmWrapperModel``, which calls ``timm.create_model(architecture, num_classes=0, **model_args)``.
So the saved folder (config.json naming the timm architecture and the text tower's config,
model.safetensors, tokenizer + processor files) loads without mmdistill::

    from transformers import AutoModel, AutoProcessor          # needs `pip install timm`
    model = AutoModel.from_pretrained("runs/x/model")            # VisionTextDualEncoderModel
    proc = AutoProcessor.from_pretrained("runs/x/model")
    inputs = proc(text=["a red circle"], images=[img], return_tensors="pt", padding=True)
    img_emb = model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
    txt_emb = model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).pooler_output

The one thing transformers needs that a timm config lacks is the tower's output width, which
``VisionTextDualEncoderModel`` reads as ``vision_config.hidden_size`` to size the projection:
it is set here from the built timm model's ``num_features`` (and saved with the config).
A plain torchvision CNN is not offered: it has no transformers config class, so the folder would
no longer load with ``AutoModel`` alone (timm covers the same ResNet / MobileNet / EfficientNet
families).

Because the student has the same ``get_image_features`` / ``get_text_features`` / ``logit_scale``
/ ``config.projection_dim`` surface as ``CLIPModel``, ``models.contrastive.encode`` and friends, the
contrastive recipe, every loss term and the evaluator take it unchanged. Teacher and student keep
their own processors: the teacher's signals always come from the teacher's tokenization of the
same text (``recipes.contrastive`` encodes every record once per processor).
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Iterable

import torch

from .contrastive import PairingError

WORDPIECE_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


class DualTowerError(PairingError):
    """A dual-encoder student that cannot be built as asked (unknown timm name, a tower without a width)."""


def check_timm_name(name: str) -> None:
    """Raise DualTowerError naming close matches when `name` is not a timm architecture."""
    import timm

    names = timm.list_models()
    if name in names:
        return
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.6)
    hint = f"; close matches: {', '.join(close)}" if close else "; see timm.list_models()"
    raise DualTowerError(f"student.dual.image_tower.timm: {name!r} is not a timm model{hint}")


def train_wordpiece(texts: Iterable[str], vocab_size: int = 1000, max_length: int = 64):
    """A lower-cased WordPiece tokenizer trained locally, BERT framing ([CLS] ... [SEP]), as a fast HF tokenizer."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=WORDPIECE_SPECIALS, show_progress=False)
    tok.train_from_iterator(list(texts), trainer)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.BertProcessing(("[SEP]", sep), ("[CLS]", cls))
    tok.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        cls_token="[CLS]",
        sep_token="[SEP]",
        pad_token="[PAD]",
        unk_token="[UNK]",
        mask_token="[MASK]",
        model_max_length=max_length,
    )


TEXT_ARCHS = ("clip", "bert")


def _text_config(tokenizer, arch: str, hidden_size: int, num_layers: int, num_heads: int, intermediate_size: int, max_length: int):
    """The text tower's transformers config.

    clip: a CLIP-style text transformer (pre-LayerNorm, causal attention, the pooled output is the state at the
    tokenizer's end token: [SEP] for WordPiece, the end-of-text token for a CLIP/BPE tokenizer); bert: a BERT
    encoder whose pooled output is BERT's pooler (tanh of a dense layer on the [CLS] state). At the tiny widths a
    phone-sized student uses, the BERT pooler learns several times more slowly from scratch (measured in
    BENCHMARKS.md, dual students): the [CLS] state has to learn to gather the caption through post-LN attention
    before the contrastive loss sees anything, whereas the end-token state of a pre-LN causal tower carries the words
    from the first steps. BERT stays the choice for a text tower initialised from a BERT / MiniLM checkpoint.
    """
    from transformers import BertConfig, CLIPTextConfig

    if not hidden_size:
        raise DualTowerError("student.dual.text_tower.hidden_size is unset: the text tower's output width is needed")
    if hidden_size % num_heads:
        raise DualTowerError(f"student.dual.text_tower: hidden_size {hidden_size} is not a multiple of num_attention_heads {num_heads}")
    if arch not in TEXT_ARCHS:
        raise DualTowerError(f"student.dual.text_tower.arch: {arch!r} is not one of {', '.join(TEXT_ARCHS)}")
    sizes = dict(vocab_size=len(tokenizer), max_position_embeddings=max_length, pad_token_id=tokenizer.pad_token_id,
                 hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=num_heads, intermediate_size=intermediate_size)
    if arch == "bert":
        return BertConfig(**sizes)
    end = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
    start = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
    if end is None:
        raise DualTowerError("student.dual.text_tower.arch=clip pools at the tokenizer's end token, and this tokenizer has none (no sep or eos token); use arch: bert")
    if end == 2:  # transformers' CLIP text model reads eos_token_id == 2 as its legacy rule (pool at the largest id)
        raise DualTowerError("student.dual.text_tower.arch=clip: this tokenizer's end token has id 2, which transformers' CLIP text model "
                             "treats as its legacy pooling rule (the largest token id); use arch: bert or another tokenizer")
    return CLIPTextConfig(**sizes, eos_token_id=int(end), bos_token_id=int(start) if start is not None else None)


def image_tower_config(timm_name: str, model_args: dict[str, Any] | None = None):
    """A TimmWrapperConfig for `timm_name` with its output width as `hidden_size` (built once, locally, to read it)."""
    import timm
    from transformers import TimmWrapperConfig

    check_timm_name(timm_name)
    args = dict(model_args or {})
    try:
        probe = timm.create_model(timm_name, pretrained=False, num_classes=0, **args)
    except TypeError as e:  # an option this architecture does not take
        raise DualTowerError(f"student.dual.image_tower.model_args: timm {timm_name!r} rejects them: {e}") from None
    width = getattr(probe, "num_features", None)
    if not width:
        raise DualTowerError(f"student.dual.image_tower: timm {timm_name!r} reports no output width (num_features); pick a model with a pooled feature output")
    config = TimmWrapperConfig(architecture=timm_name, model_args=args or None, num_labels=0)
    config.hidden_size = int(width)  # what VisionTextDualEncoderModel sizes its visual projection with
    return config


WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "pytorch_model.pth")


def _weights_file(path: str | Path) -> Path:
    p = Path(path)
    if p.is_dir():
        for name in WEIGHT_FILES:
            if (p / name).is_file():
                return p / name
        raise DualTowerError(f"student.dual.image_tower.weights: {p} holds none of {', '.join(WEIGHT_FILES)}")
    if not p.is_file():
        raise DualTowerError(f"student.dual.image_tower.weights: {p} does not exist")
    return p


def load_image_tower_weights(timm_model: torch.nn.Module, path: str | Path, classifier: str | None = None) -> dict[str, Any]:
    """Copy pretrained timm weights (a timm / Hugging Face timm folder, or a .safetensors / .pth file) into the
    student's image tower. Keys may carry a ``timm_model.`` (a saved TimmWrapperModel) or ``module.`` prefix; the
    source's classifier (`classifier`: the architecture's head name, e.g. ``fc``) is dropped, since the tower is
    built with ``num_classes=0``. Any other key the tower lacks, a tower key the file lacks, or a shape that differs
    (e.g. ImageNet weights for a narrowed ``model_args``) is a DualTowerError naming it. -> what was loaded."""
    from timm.models import load_state_dict

    file = _weights_file(path)
    try:
        state = load_state_dict(str(file))
    except Exception as e:  # a corrupt or non-checkpoint file
        raise DualTowerError(f"student.dual.image_tower.weights: {file} is not a readable checkpoint: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from None
    for prefix in ("timm_model.", "module."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    own = timm_model.state_dict()
    head = (classifier or "").rstrip(".")
    dropped = [k for k in state if k not in own and head and (k == head or k.startswith(head + "."))]
    for k in dropped:
        del state[k]
    extra = [k for k in state if k not in own]
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]  # often left out of published weights
    if extra or missing:
        what = (f"{len(missing)} tower weights missing from it (e.g. {', '.join(missing[:3])})" if missing else "") + \
               ("; " if missing and extra else "") + (f"{len(extra)} weights the tower lacks (e.g. {', '.join(extra[:3])})" if extra else "")
        raise DualTowerError(f"student.dual.image_tower.weights: {file} does not fit timm {type(timm_model).__name__}: {what}")
    for k, v in state.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise DualTowerError(f"student.dual.image_tower.weights: {file}: {k} has shape {tuple(v.shape)}, the tower's is {tuple(own[k].shape)} "
                                 "(weights for another width: check model_args)")
    timm_model.load_state_dict(state, strict=False)  # every key checked above; only BatchNorm step counters may be absent
    return {"file": str(file), "tensors": len(state), "dropped_classifier": dropped}


def load_text_tower(path: str | Path):
    """A pretrained text tower and its tokenizer from a Hugging Face folder (BERT, MiniLM, RoBERTa...: any model with a
    pooled output, which ``VisionTextDualEncoderModel`` projects). -> (model, tokenizer)"""
    from transformers import AutoModel, AutoTokenizer

    p = Path(path)
    if not (p / "config.json").is_file():
        raise DualTowerError(f"student.dual.text_tower.weights: {p} is not a Hugging Face model folder (no config.json)")
    try:
        model = AutoModel.from_pretrained(str(p))
        tokenizer = AutoTokenizer.from_pretrained(str(p))
    except (OSError, ValueError, KeyError) as e:
        raise DualTowerError(f"student.dual.text_tower.weights: cannot load {p}: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from None
    with torch.no_grad():
        ids = tokenizer(["a"], return_tensors="pt")
        pooled = getattr(model.eval()(**ids), "pooler_output", None)
    if pooled is None:
        raise DualTowerError(f"student.dual.text_tower.weights: {p} ({type(model).__name__}) has no pooled output for the dual encoder to project "
                             "(e.g. DistilBERT); use a BERT-family model with a pooler")
    return model, tokenizer


def build_dual_student(
    texts: Iterable[str],
    *,
    timm_name: str,
    model_args: dict[str, Any] | None = None,
    image_weights: str | Path | None = None,
    text_weights: str | Path | None = None,
    image_size: int = 64,
    projection_dim: int | None = 64,
    text_arch: str = "clip",
    hidden_size: int = 64,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 2,
    intermediate_size: int = 256,
    vocab_size: int = 1000,
    max_length: int = 64,
    tokenizer=None,
    image_processor=None,
    logit_scale_init: float = 2.6592,
    seed: int = 0,
    out_dir: str | Path | None = None,
):
    """Build a randomly initialised timm + BERT ``VisionTextDualEncoderModel`` and its processor.

    `image_weights`: a timm checkpoint (folder or file) loaded into the image tower (``load_image_tower_weights``).
    `text_weights`: a Hugging Face text model folder (``load_text_tower``) used as the text tower with its own
    tokenizer; its config sets the tower's sizes (`text_arch`, `hidden_size`... are then unused) and `tokenizer`
    must be None.
    `tokenizer`: None trains a WordPiece tokenizer on `texts`; or pass one (e.g. the teacher's, for a
    same-tokenizer student). `image_processor`: None makes a CLIP image processor resizing to `image_size`.
    Returns (model, processor); both saved to `out_dir` when given.
    """
    from transformers import CLIPImageProcessor, VisionTextDualEncoderConfig, VisionTextDualEncoderModel, VisionTextDualEncoderProcessor

    if not projection_dim:
        raise DualTowerError("student.dual.projection_dim is unset: the shared embedding width both towers project to is needed")
    texts = list(texts)
    text_model = None
    if text_weights is not None:
        if tokenizer is not None:
            raise DualTowerError("student.dual.text_tower: a pretrained text tower (weights) comes with its own tokenizer; leave tokenizer at wordpiece")
        text_model, tokenizer = load_text_tower(text_weights)
    if tokenizer is None:
        tokenizer = train_wordpiece(texts, vocab_size=vocab_size, max_length=max_length)
    max_length = min(int(tokenizer.model_max_length), max_length) if tokenizer.model_max_length < 10_000 else max_length
    v_cfg = image_tower_config(timm_name, model_args)
    t_cfg = text_model.config if text_model is not None else _text_config(tokenizer, text_arch, hidden_size, num_hidden_layers, num_attention_heads, intermediate_size, max(max_length, 8))
    config = VisionTextDualEncoderConfig.from_vision_text_configs(v_cfg, t_cfg, projection_dim=projection_dim, logit_scale_init_value=logit_scale_init)
    torch.manual_seed(seed)
    model = VisionTextDualEncoderModel(config=config, text_model=text_model)
    if image_weights is not None:
        tower = model.vision_model.timm_model
        load_image_tower_weights(tower, image_weights, classifier=(getattr(tower, "pretrained_cfg", None) or {}).get("classifier"))
    if image_processor is None:
        image_processor = CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}, do_center_crop=True)
    processor = VisionTextDualEncoderProcessor(image_processor=image_processor, tokenizer=tokenizer)
    if out_dir is not None:
        model.save_pretrained(out_dir)
        processor.save_pretrained(out_dir)
    return model, processor


def tower_parameters(model) -> dict[str, int]:
    """Parameter counts of a dual encoder's parts: vision, text, projections + scale."""
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    total = count(model)
    vision, text = count(model.vision_model), count(model.text_model)
    return {"vision": vision, "text": text, "heads": total - vision - text, "total": total}
