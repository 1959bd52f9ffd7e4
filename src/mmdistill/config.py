"""Typed recipes: YAML in, validated pydantic objects out.

Every field has help text (``description``); unknown keys are errors, and a
``key=value`` override on the command line goes through the same validation.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


RECORD_KIND = {"contrastive": "pair", "reranker": "rerank", "generative": "chat"}  # the records each family trains on


class RecipeError(ValueError):
    """A recipe that cannot be used; the message is one line naming the file and key."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(Strict):
    train: Path = Field(description="JSONL file of training records: pair records (contrastive), rerank records (reranker), chat records (generative).")
    val: Path | None = Field(None, description="JSONL file evaluated at the end of training (and by `mmdistill eval`).")
    zeroshot: Path | None = Field(None, description="zeroshot_<split>.json of ShapesWorld-style zero-shot tasks, evaluated with `val`.")
    on_error: Literal["fail", "skip"] = Field("fail", description="Bad records: stop at the first one, or skip them and report how many and why.")
    stream: bool = Field(
        False,
        description="Decode images when a batch needs them (in a pool of threads) instead of all at the start: a data set "
        "larger than memory trains; a corrupt image then stops the run at its batch, naming the file and line "
        "(run `mmdistill data check` first). The batch order, and so resume, is the same either way.",
    )
    max_records: int | None = Field(None, ge=1, description="Use only the first N valid training records (quick runs).")
    max_length: int = Field(512, ge=8, description="Longest tokenised input (a reranker pair, a chat turn); a longer one is an error naming the record.")
    response_field: Literal["response", "teacher_response"] = Field(
        "response", description="Generative: which field of a chat record is the target text (teacher_response = black-box / sequence-level KD)."
    )
    group_size: int | None = Field(
        None,
        ge=2,
        description="Reranker training: documents per query in each step — the best-labelled one plus a random draw of the others, "
        "fresh each step (1 positive + n negatives, as cross-encoders are usually trained); fewer pairs per step, so faster steps. "
        "None: every document. Evaluation always ranks every document.",
    )
    group_sampling: Literal["uniform", "graded"] = Field(
        "uniform",
        description="Reranker, with group_size: how the other documents of a group are drawn. uniform: all alike. graded: "
        "without replacement with weight 1 + label, so near-misses (hard negatives) share a group with the best document "
        "more often and a step spends its pairs where the order is hard; unlabelled queries draw uniformly.",
    )
    curriculum: dict[str, float] | None = Field(
        None,
        description="Generative: difficulty curriculum, tag -> training progress at which records with that tag join, e.g. {easy: 0, medium: 0.3, hard: 0.5}; untagged records join at 0.",
    )


class TeacherConfig(Strict):
    kind: Literal["live", "store"] = Field(
        "live",
        description="live: run the teacher model during training (or once into memory with `cache`); store: read its signals "
        "from a store that `mmdistill teacher cache` wrote (`path`), without loading the teacher.",
    )
    model: str | None = Field(None, description="Hugging Face model id or local folder of the teacher (kind=live; with kind=store, checked against the store's teacher when given).")
    path: Path | None = Field(None, description="kind=store: the store folder written by `mmdistill teacher cache`.")
    on_missing: Literal["fail", "live"] = Field(
        "fail", description="kind=store, a training record the store lacks: fail naming it, or compute it with the live teacher (`model`, else the store's) at start-up."
    )
    trust_remote_code: bool = Field(False, description="Allow the model's own code from the hub (off by default).")
    cache: bool = Field(
        False,
        description="Compute the teacher's signals for every training record once before training instead of live each step "
        "(same result, since training applies no augmentation; much cheaper when the teacher is big).",
    )

    @model_validator(mode="after")
    def _check(self) -> "TeacherConfig":
        if self.kind == "live" and not self.model:
            raise ValueError("teacher: kind=live needs `model`")
        if self.kind == "store" and self.path is None:
            raise ValueError("teacher: kind=store needs `path` (a folder written by `mmdistill teacher cache`)")
        if self.kind == "store" and self.cache:
            raise ValueError("teacher: kind=store reads stored signals; `cache` is for a live teacher (remove it)")
        return self


class ImageTowerConfig(Strict):
    timm: str = Field(description="timm architecture name (e.g. resnet10t, mobilenetv3_small_050), built locally with pretrained=False, num_classes=0.")
    model_args: dict[str, Any] = Field(default_factory=dict, description="Extra keyword arguments for timm.create_model, e.g. {channels: [16, 32, 48, 64], stem_width: 16} for a narrower resnet10t.")
    image_size: int = Field(64, ge=16, description="Side (pixels) the student's image processor resizes and crops to.")
    weights: str | None = Field(
        None,
        description="Pretrained weights for the image tower: a timm / Hugging Face timm folder (model.safetensors or pytorch_model.bin) or a "
        ".safetensors / .pth file of the same architecture and model_args; its classifier is dropped. None: random init.",
    )


class TextTowerConfig(Strict):
    arch: Literal["clip", "bert"] = Field(
        "clip",
        description="clip: a CLIP-style text transformer (pre-LN, causal, pooled at the tokenizer's end token); bert: a BERT encoder pooled by its "
        "[CLS] pooler, which learns several times more slowly from scratch at tiny widths (BENCHMARKS.md, dual students).",
    )
    hidden_size: int = Field(64, ge=1, description="Text tower hidden width (its output width).")
    num_hidden_layers: int = Field(2, ge=1, description="Text tower layers.")
    num_attention_heads: int = Field(2, ge=1, description="Text tower attention heads (must divide hidden_size).")
    intermediate_size: int = Field(256, ge=1, description="Text tower MLP width.")
    tokenizer: str = Field(
        "wordpiece",
        description="wordpiece: a WordPiece tokenizer trained here on the training texts (the student's own); teacher: the teacher's tokenizer; "
        "or a folder / hub id of a tokenizer to load.",
    )
    vocab_size: int = Field(1000, ge=16, description="tokenizer=wordpiece: largest vocabulary to train.")
    weights: str | None = Field(
        None,
        description="A pretrained text tower: a Hugging Face folder of a model with a pooled output (BERT, MiniLM, RoBERTa...) and its tokenizer. "
        "Its config sets the sizes (arch, hidden_size... unused); tokenizer must stay wordpiece (the folder's own is used). None: built here.",
    )
    max_length: int = Field(64, ge=8, description="Longest tokenised text (BERT position embeddings).")


class DualStudentConfig(Strict):
    image_tower: ImageTowerConfig = Field(description="The image tower: a timm model by name.")
    text_tower: TextTowerConfig = Field(default_factory=TextTowerConfig, description="The text tower: a tiny CLIP-style or BERT text transformer with its own tokenizer.")
    projection_dim: int = Field(description="Shared embedding width both towers project to (linear, no bias).")


class StudentConfig(Strict):
    init: Literal["tiny", "scratch", "inherit", "pretrained", "compose", "dual"] = Field(
        "scratch",
        description=(
            "tiny: a tiny model of the real architecture with a tokenizer trained on the data; "
            "scratch: the config of `model` (default: the teacher) with `overrides`, randomly initialised; "
            "inherit: shrink the teacher by keeping `layers` and pruning it to narrower widths from `overrides`, "
            "keeping its most important channels, heads and neurons (compress.prune); its weights are the teacher's; "
            "pretrained: load `model` as it is; "
            "compose (generative): a LLaVA-style model from `parts` (a vision tower, a language model) and a new MLP projector; "
            "dual (contrastive): a heterogeneous dual encoder from `dual` (a timm image tower + a tiny BERT text tower with its own "
            "tokenizer), saved as a transformers VisionTextDualEncoderModel."
        ),
    )
    dual: DualStudentConfig | None = Field(None, description="init=dual: the image tower, the text tower and the shared projection width.")
    model: str | None = Field(None, description="Model id or folder the student starts from (scratch/pretrained); default the teacher.")
    preset: str | None = Field(
        None,
        description="Tiny preset when init=tiny: contrastive clip-teacher | clip-student | clip-nano (default clip-student); "
        "reranker / generative vlm-teacher | vlm-student | vlm-nano (default vlm-student).",
    )
    head: Literal["yesno", "seq_cls"] = Field("yesno", description="Reranker, init=tiny: a yes/no reranker (tiny Qwen3-VL) or a sequence-classification head (tiny Qwen3, text only).")
    parts: dict[str, str] = Field(
        default_factory=dict,
        description="init=compose: {vision: folder of a SigLIP/CLIP (vision) model, language: folder of a causal LM}.",
    )
    trainable: Literal["all", "projector", "no_vision"] = Field(
        "all",
        description="Which student parameters train: all; projector only (the align stage of a composed student); everything but the vision tower.",
    )
    image_size: int | None = Field(None, ge=32, description="init=tiny, generative / reranker: the side (pixels, a multiple of 32) the processor resizes images to; default 64 (4 image tokens).")
    arch: Literal["qwen3_vl", "qwen2_5_vl", "qwen3_vl_moe", "qwen3_omni_thinker", "qwen3"] = Field(
        "qwen3_vl", description="Generative, init=tiny: which architecture to build (qwen3: a text-only Qwen3ForCausalLM for chat records without images)."
    )
    overrides: dict[str, Any] = Field(
        default_factory=dict,
        description="Config overrides as dotted keys, e.g. {'vision_config.hidden_size': 64, 'text_config.num_hidden_layers': 2}.",
    )
    layers: dict[str, list[int]] = Field(
        default_factory=dict,
        description="init=inherit: teacher layer indices to keep per tower, e.g. {'vision': [0, 3], 'text': [0, 3]}.",
    )
    fake_quant: Literal["int8-dynamic", "int8-weight", "int4-weight"] | None = Field(
        None,
        description="Quantization-aware distillation: train with the student's Linear layers fake-quantized as this method quantizes them "
        "(torchao QAT: int4 weights in groups of 32, int8 weights per channel, + int8 activations per token for int8-dynamic); the saved "
        "model holds the full-precision weights, ready for `mmdistill quantize --method` the same method (compress/qat.py).",
    )
    calibration: int = Field(
        64,
        ge=1,
        description="init=inherit with narrower width `overrides`: how many training records (queries for a reranker) run through the teacher "
        "to rank its channels, heads and MLP neurons by activation (Minitron-style importance).",
    )

    @model_validator(mode="after")
    def _check(self) -> "StudentConfig":
        if self.init == "inherit" and not self.layers and not self.overrides:
            raise ValueError("init=inherit needs `layers` (teacher layers to keep) or narrower `overrides`")
        if self.init == "pretrained" and not self.model:
            raise ValueError("init=pretrained needs `model`")
        if (self.init == "dual") != (self.dual is not None):
            raise ValueError("init=dual needs a `dual:` section (image_tower, text_tower, projection_dim)" if self.dual is None else "`dual:` is only read with init=dual")
        return self


class LoraSettingsConfig(Strict):
    r: int = Field(8, ge=1, description="LoRA rank.")
    alpha: float = Field(16.0, gt=0, description="LoRA alpha (scale = alpha / r).")
    dropout: float = Field(0.0, ge=0, lt=1, description="LoRA dropout.")
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"], description="Linear module names that get adapters; a name the model lacks is an error.")
    language_only: bool = Field(True, description="Adapt the language model only, not the vision tower.")


class LossTerm(Strict):
    weight: float = Field(1.0, description="Weight of this term in the total loss.")
    schedule: dict[str, Any] | None = Field(None, description="Weight schedule, e.g. {kind: linear, start: 1.0, end: 0.0}.")
    options: dict[str, Any] = Field(default_factory=dict, description="Term options, e.g. {temperature: {kind: cosine, start: 8, end: 2}}.")


class LossConfig(Strict):
    terms: dict[str, LossTerm] = Field(
        default_factory=lambda: {"clip": LossTerm()},
        description="Named loss terms with weights, schedules and options. contrastive: clip, siglip, sim_kd, crd, fd, icl, affinity; "
        "reranker: bce, ce, pointwise, margin_mse, listwise_kl, feature; generative: sft, kd, vision, text.",
    )


class TrainConfig(Strict):
    max_steps: int = Field(500, ge=1, description="Optimizer steps.")
    batch_size: int = Field(64, ge=1, description="Global batch per optimizer micro-step, over all processes (must divide by the process count).")
    grad_accum: int = Field(1, ge=1, description="Micro-batches accumulated per optimizer step.")
    lr: float = Field(1e-3, gt=0, description="Peak learning rate (AdamW).")
    weight_decay: float = Field(0.05, ge=0, description="AdamW weight decay (not applied to biases, norms, embeddings' logit scale).")
    betas: tuple[float, float] = Field((0.9, 0.98), description="AdamW betas.")
    warmup_steps: int = Field(50, ge=0, description="Linear warm-up steps before the cosine decay.")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="Final learning rate as a fraction of the peak.")
    max_grad_norm: float | None = Field(1.0, description="Clip the gradient norm to this value (None: no clipping).")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field("auto", description="auto: bf16 AMP on GPUs that support it, fp32 on CPU.")
    save_every: int = Field(200, ge=1, description="Checkpoint every N optimizer steps (and at the end).")
    keep_last: int = Field(2, ge=1, description="How many checkpoints to keep.")
    log_every: int = Field(10, ge=1, description="Write metrics.jsonl / TensorBoard every N steps.")
    threads: int | None = Field(None, ge=1, description="torch CPU threads (default: torch's choice).")
    prefetch: int = Field(
        0, ge=0, le=64,
        description="Micro-batches prepared ahead in a background thread while the current step computes: records read, images and clips "
        "decoded, text tokenised, stored teacher signals read (a step module's `prepare`). 0 (default): each step prepares its own. The "
        "batches, their order and the losses are the same either way. Pays off when preparing is heavy next to a step whose kernels release "
        "the GIL (streamed images); on 2 CPU cores with tiny models it ranged from 1.16x to 0.73x (benchmarks/prefetch.py).",
    )
    sharding: Literal["none", "fsdp", "zero2", "zero3"] = Field(
        "none",
        description="fsdp: shard the student's parameters, gradients and optimizer state over the processes with PyTorch FSDP2 (`fully_shard` on "
        "every transformer block, then the whole step module); checkpoints and the final folder are gathered, so they are the same files as "
        "unsharded training writes. zero2 / zero3: DeepSpeed ZeRO stage 2 (optimizer state and gradients partitioned) or 3 (weights too), "
        "engine/zero.py; checkpoints hold the gathered weights plus DeepSpeed's partitioned state, which resumes under the same stage and "
        "process count. An accelerate launch with configs/accelerate/fsdp.yaml or deepspeed-zero2/3.yaml sets the same. Any launcher, CPU "
        "(gloo) or GPU (NCCL); with one process it trains unsharded.",
    )
    gradient_checkpointing: bool = Field(False, description="Recompute the student's block activations in backward (Hugging Face gradient checkpointing): less activation memory for about a third more compute. Any family whose model supports it.")


class EvalConfig(Strict):
    ks: list[int] = Field(default_factory=lambda: [1, 5, 10], description="Recall@k cut-offs.")
    max_items: int | None = Field(1000, ge=1, description="Evaluate the first N validation records (contrastive: the gallery size; reranker: queries; generative: prompts).")
    latency: bool = Field(True, description="Measure latency (contrastive: batch 1 and 32; reranker: one query with `candidates` documents; generative: per sample).")
    reference: str | None = Field(None, description="Model folder that agreement metrics compare with (reranker top-3 overlap / Kendall tau, generative answer agreement); default: the recipe's teacher.")
    candidates: int = Field(20, ge=1, description="Reranker latency: documents per query.")
    max_new_tokens: int = Field(48, ge=1, description="Generative: longest generated answer.")


class Recipe(Strict):
    family: Literal["contrastive", "reranker", "generative"] = Field("contrastive", description="Model family.")
    output_dir: Path = Field(description="Run directory: checkpoints, logs, the final model, eval.json.")
    seed: int = Field(0, description="Seed for initialisation, data order and dropout.")
    name: str | None = Field(None, description="Name used in reports (default: the output folder's name).")
    role: Literal["teacher", "student", "baseline"] | None = Field(None, description="Role in reports (default from teacher presence).")
    data: DataConfig
    teacher: TeacherConfig | None = Field(None, description="Absent: plain training (teachers, baselines).")
    student: StudentConfig = Field(default_factory=StudentConfig)
    lora: LoraSettingsConfig | None = Field(None, description="Generative: train LoRA adapters (PEFT) instead of all weights; the run saves the adapter and the merged model.")
    loss: LossConfig = Field(default_factory=LossConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @model_validator(mode="after")
    def _check(self) -> "Recipe":
        if self.student.fake_quant and self.lora is not None:
            raise ValueError("student.fake_quant trains the full student fake-quantized; it does not combine with lora (remove one)")
        if self.student.fake_quant and self.family == "contrastive":
            raise ValueError("student.fake_quant (quantization-aware distillation) is implemented for the reranker and generative families")
        if self.data.group_size is not None and self.family != "reranker":
            raise ValueError(f"data.group_size samples a reranker query's documents; a {self.family} recipe has none (remove it)")
        if self.data.group_sampling != "uniform" and self.data.group_size is None:
            raise ValueError(f"data.group_sampling={self.data.group_sampling} draws documents for a group: set data.group_size too (a reranker recipe)")
        if self.teacher is not None and self.teacher.model and self.eval.reference and self.eval.reference.rstrip("/") != self.teacher.model.rstrip("/"):
            raise ValueError(
                f"eval.reference ({self.eval.reference}) and teacher.model ({self.teacher.model}) name two different teachers; "
                "a distilled student is compared with its own teacher: remove eval.reference (it defaults to teacher.model) "
                "or make them agree (compare with another model through `mmdistill eval --reference`)"
            )
        if self.teacher is None:
            if self.student.init in ("scratch", "inherit") and not self.student.model:
                if self.student.init == "inherit":
                    raise ValueError("student.init=inherit needs a teacher")
                raise ValueError("student.init=scratch without a teacher needs student.model (or use init=tiny)")
        return self

    def fingerprint(self) -> str:
        """Hash of everything that changes the run's result (not where it is written)."""
        d = self.model_dump(mode="json")
        d.pop("output_dir", None)
        d.pop("name", None)
        d.pop("role", None)
        d.pop("eval", None)
        for key in ("save_every", "keep_last", "log_every", "threads", "prefetch", "sharding"):  # how often / how fast / where, not what
            d["train"].pop(key, None)
        for key, default in ADDED_FIELDS.items():  # at its default, a field added later leaves older runs' hash as it was
            section, _, leaf = key.partition(".")
            if isinstance(d.get(section), dict) and d[section].get(leaf) == default:
                d[section].pop(leaf)
        blob = json.dumps(d, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


# Fields added after runs were recorded, with their defaults: left out of `Recipe.fingerprint` at the default,
# so a run recorded before the field existed still resumes and is still reused (same result, same hash).
ADDED_FIELDS: dict[str, Any] = {"student.calibration": 64, "data.group_sampling": "uniform", "teacher.kind": "live", "teacher.path": None, "teacher.on_missing": "fail", "data.stream": False, "student.dual": None, "student.fake_quant": None}


def set_dotted(d: dict, key: str, value: Any) -> None:
    """``d["a"]["b"] = value`` for ``key="a.b"``, creating (or replacing non-dict) levels on the way; the value is replaced, never merged."""
    parts = key.split(".")
    cur = d
    for p in parts[:-1]:
        if not isinstance(cur.get(p), dict):
            cur[p] = {}
        cur = cur[p]
    cur[parts[-1]] = value


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """`a.b=3 c=[1,2]` -> nested dict; values parsed as YAML scalars/lists."""
    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise RecipeError(f"override {pair!r}: expected key=value")
        key, raw = pair.split("=", 1)
        key = key.strip()
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError:
            raise RecipeError(f"override {pair!r}: the value is not valid YAML") from None
        # below these keys the rest is itself a dotted key (model config paths), not nesting
        for flat in ("student.overrides.", "student.layers."):
            if key.startswith(flat):
                out.setdefault("student", {}).setdefault(flat.split(".")[1], {})[key[len(flat):]] = value
                break
        else:
            set_dotted(out, key, value)
    return out


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def _format_error(source: str, err: ValidationError) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"]) or "(top)"
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    more = f" (+{len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    return f"{source}: {loc}: {msg}{more}"


def recipe_from_dict(data: dict, source: str = "<recipe>", base_dir: Path | None = None) -> Recipe:
    """Validate a recipe dict; relative data paths are taken relative to `base_dir` when they exist there."""
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as e:
        raise RecipeError(_format_error(source, e)) from None
    return recipe


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise RecipeError(f"{where}: invalid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a mapping of keys, got {type(data).__name__}")
    if overrides:
        data = _merge(data, parse_overrides(overrides))
    return recipe_from_dict(data, source=str(path))


# ---------------------------------------------------------------------------------------------
# pipelines: prune -> distill (heal) -> quantize -> evaluate, declared in YAML (`mmdistill pipeline`)


class PipelineOriginal(Strict):
    model: str = Field(description="Folder of the original (unpruned) model: the first stage's input, the healing teacher and the report's 100% row.")
    train: list[str] = Field(
        default_factory=list,
        description="Recipes (shipped names such as reranker/shapesworld-teacher.yaml, or paths) that make `model`, trained in order "
        "when `model` is missing or a recipe's run is unfinished; empty: `model` must exist.",
    )


class PipelineData(Strict):
    train: Path = Field(description="Training records of the family (calibration for pruning, healing data for distillation).")
    val: Path = Field(description="Held-out records every stage is evaluated on.")
    max_length: int = Field(512, ge=8, description="Longest tokenised input (as a recipe's data.max_length); also set on the distillation stages.")


class PruneStage(Strict):
    layers: dict[str, list[int]] = Field(default_factory=dict, description="Blocks to keep per tower, e.g. {text: [0, 1, 3], vision: [0]} (the recipes' init=inherit).")
    widths: dict[str, int] = Field(
        default_factory=dict,
        description="Narrower widths as dotted config keys, e.g. {text_config.hidden_size: 64}: the most active channels, heads and neurons on "
        "`calibration` training records are kept (compress/prune.py).",
    )
    experts: float | None = Field(None, gt=0, lt=1, description="Generative MoE: fraction of every sparse layer's experts to prune (compress/experts.py).")
    method: Literal["reap", "frequency", "reconstruction"] = Field("reap", description="Expert saliency for `experts`.")
    drop_layers: str | None = Field(None, description="Generative: blocks to drop, auto:N (by block importance) or text:3,5;vision:1 (compress/depth.py).")
    calibration: int = Field(64, ge=4, description="Training records the saliencies and importances are measured on.")

    @model_validator(mode="after")
    def _check(self) -> "PruneStage":
        if not (self.layers or self.widths or self.experts is not None or self.drop_layers):
            raise ValueError("a prune stage needs layers, widths, experts and/or drop_layers")
        return self


class DistillStage(Strict):
    fake_quant: Literal["int8-dynamic", "int8-weight", "int4-weight"] | None = Field(
        None, description="Quantization-aware distillation: the student trains fake-quantized as this method (set it to the next quantize stage's method)."
    )
    recipe: str = Field(
        description="A distillation recipe (shipped name or path) whose loss and training settings heal the stage's input: the pipeline sets its "
        "teacher (the original model), its student (init=pretrained from the input), its data and its output folder."
    )
    overrides: dict[str, Any] = Field(default_factory=dict, description="Dotted recipe keys to change, e.g. {train.max_steps: 300}.")


class QuantizeStage(Strict):
    method: Literal["int8-dynamic", "int8-weight", "int4-weight", "bnb-int8", "bnb-nf4", "gptq-int4", "awq-int4"] = Field(
        description="torchao method, bitsandbytes (bnb-*, the `bnb` extra) or GPTQ / AWQ (the `gptq` extra) (compress/quantize.py).")
    calibration: str | None = Field(None, description="gptq-int4 / awq-int4: calibration data (chat / rerank JSONL or a text file); default the pipeline's data.train.")
    store_dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="torchao methods: the on-disk dtype of the matrices left unquantized (embeddings, patch convolution); bfloat16 halves "
        "them, and mmdistill's loaders upcast them to fp32 as they load.")


class PipelineStage(Strict):
    name: str = Field(description="Stage name: its folder under output_dir and its row in the report.")
    input: str | None = Field(None, description="The stage (by name) or model folder this stage starts from; default the previous stage (the first: the original).")
    prune: PruneStage | None = Field(None, description="Prune the input (exactly one of prune / distill / quantize).")
    distill: DistillStage | None = Field(None, description="Distill the input against the original model (healing).")
    quantize: QuantizeStage | None = Field(None, description="Quantize the input.")

    @model_validator(mode="after")
    def _check(self) -> "PipelineStage":
        given = [k for k in ("prune", "distill", "quantize") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"stage {self.name!r}: give exactly one of prune / distill / quantize (got {given or 'none'})")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in ("prune", "distill", "quantize") if getattr(self, k) is not None)


class PipelineEval(Strict):
    max_items: int | None = Field(300, ge=1, description="Validation records evaluated per stage (queries / prompts).")
    batch: int = Field(20, ge=2, description="Batched latency: documents scored with one query (reranker) or prompts per forward (generative).")
    repeats: int = Field(10, ge=1, description="Timed calls per latency figure (the median is reported).")
    threads: int | None = Field(None, ge=1, description="torch threads while timing (default: torch's choice).")
    max_new_tokens: int = Field(40, ge=1, description="Generative: longest generated answer.")


class PipelineConfig(Strict):
    family: Literal["reranker", "generative"] = Field(description="Model family of every stage.")
    output_dir: Path = Field(description="One folder per stage (each with model/) and report/.")
    seed: int = Field(0, description="Seed of the distillation stages.")
    original: PipelineOriginal
    data: PipelineData
    stages: list[PipelineStage] = Field(min_length=1, description="Stages in run order.")
    eval: PipelineEval = Field(default_factory=PipelineEval)

    @model_validator(mode="after")
    def _check(self) -> "PipelineConfig":
        seen: list[str] = []
        for s in self.stages:
            if s.name in seen or s.name in ("original", "report"):
                raise ValueError(f"stage name {s.name!r} is {'used twice' if s.name in seen else 'reserved'}")
            if s.prune is not None:
                generative_only = [k for k in ("experts", "drop_layers") if getattr(s.prune, k) is not None]
                if self.family == "reranker" and generative_only:
                    raise ValueError(f"stage {s.name!r}: {generative_only[0]} prunes generative models; a reranker stage prunes layers and widths")
                if self.family == "generative" and s.prune.layers:
                    raise ValueError(f"stage {s.name!r}: a generative stage drops blocks with drop_layers (layers is the reranker's keep-list)")
            seen.append(s.name)
        return self


def load_pipeline(path: str | Path, overrides: list[str] | None = None) -> PipelineConfig:
    """A pipeline YAML, validated; errors are one line naming the file and the key."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: pipeline file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise RecipeError(f"{path}:{mark.line + 1 if mark else '?'}: invalid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a pipeline is a mapping of keys, got {type(data).__name__}")
    if overrides:
        data = _merge(data, parse_overrides(overrides))
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as e:
        raise RecipeError(_format_error(str(path), e)) from None
