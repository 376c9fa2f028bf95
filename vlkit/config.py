"""Recipes: the machinery every stage shares, the sections they share, and the align / instruct schema.

A recipe is YAML read with `safe_load`, changed by `a.b=value` overrides from the command line,
and validated by pydantic models that forbid unknown keys. Every problem a user can cause is one
`ConfigError` line: an unknown key with a did-you-mean, a wrong type with its key path, a
missing data file. The keys every stage has (`BaseDataSection`, `BaseTrainSection`) are declared
once here, so a name means the same thing in every stage; `vlkit.clip.recipe` builds the
`stage: clip` schema on them; `vlkit.recipe.load_recipe` picks the schema by the `stage` key.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from vlkit.errors import ConfigError


class StrictSection(BaseModel):
    """Base of every recipe section: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


# --- generic machinery (shared with the clip stage's schema) -----------------------------------------
def set_dotted(tree: dict, dotted: str, value: Any) -> None:
    node = tree
    *parents, leaf = dotted.split(".")
    for key in parents:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override '{dotted}': '{key}' is not a section")
        node = child
    node[leaf] = value


def apply_overrides(tree: dict, overrides: list[str] | None) -> dict:
    """Apply `a.b=value` overrides; values parse as YAML (`10`, `true`, `[a, b]`, `null`)."""
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not key=value (e.g. train.max_steps=10)")
        key, raw = item.split("=", 1)
        set_dotted(tree, key.strip(), yaml.safe_load(raw))
    return tree


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe not found: {path}")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"recipe {path} is not valid YAML{where}: {getattr(error, 'problem', error)}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"recipe {path} must be a YAML mapping of sections")
    return tree


def _known_keys(model: type[BaseModel], location: tuple) -> list[str]:
    for part in location[:-1]:
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None)
        candidates = [annotation, *getattr(annotation, "__args__", ())]
        model = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if model is None:
            return []
    return list(model.model_fields)


def _key_path(schema: type[BaseModel], location: tuple) -> tuple:
    """The recipe keys of an error's location, without the tags pydantic adds for a union's members
    (`train.bf16.bool` -> `train.bf16`); an unknown key stays, as the last part."""
    kept: list = []
    section: Any = schema
    for part in location:
        if isinstance(part, int):
            kept.append(part)
            continue
        if not (isinstance(section, type) and issubclass(section, BaseModel)):
            break  # below a value: a union member's tag
        kept.append(part)
        field = section.model_fields.get(str(part))
        if field is None:
            break  # an unknown key
        annotation = field.annotation
        section = next((c for c in (annotation, *getattr(annotation, "__args__", ()))
                        if isinstance(c, type) and issubclass(c, BaseModel)), None)
    return tuple(kept)


def describe_validation_error(error: ValidationError, schema: type[BaseModel]) -> str:
    """One line for the first problem: the key path, and a did-you-mean for unknown keys."""
    errors = error.errors()
    first = errors[0]
    location = _key_path(schema, tuple(first["loc"]))
    where = ".".join(str(part) for part in location) or "recipe"
    if first["type"] == "extra_forbidden":
        close = difflib.get_close_matches(str(location[-1]), _known_keys(schema, location), n=1)
        hint = f"; did you mean '{'.'.join([*map(str, location[:-1]), close[0]])}'?" if close else ""
        return f"unknown recipe key '{where}'{hint}"
    if first["type"] == "missing":
        return f"recipe key '{where}' is required"
    # A union's members fail one by one: what each would have taken, in one message.
    messages = dict.fromkeys(e["msg"].removeprefix("Value error, ") for e in errors
                             if _key_path(schema, tuple(e["loc"])) == location)
    message = "; or ".join(messages)
    if _names_a_section(schema, location):  # a check across keys: the message names them; the tree is noise
        return f"{'recipe' if where == 'recipe' else f'recipe section {where!r}'}: {message}"
    return f"recipe key '{where}': {message} (got {first.get('input')!r})"


def _names_a_section(schema: type[BaseModel], location: tuple) -> bool:
    """Whether `location` is the whole recipe or one of its sections (not a key holding a value)."""
    section: Any = schema
    for part in location:
        field = section.model_fields.get(str(part))
        section = field.annotation if field is not None else None
        if not (isinstance(section, type) and issubclass(section, BaseModel)):
            return False
    return True


def validate_tree(tree: dict, schema: type[BaseModel]) -> Any:
    try:
        return schema.model_validate(tree)
    except ValidationError as error:
        raise ConfigError(describe_validation_error(error, schema)) from None


# --- sections every stage shares (one name, one meaning; a stage may change a default) ---------------
class BaseDataSection(StrictSection):
    """Where a stage's data is, and what a bad sample gets."""

    dir: str = "."  # base of the relative paths below
    train_file: str
    val_file: str | None = None
    image_root: str | None = None  # default: `dir`
    on_bad_sample: Literal["skip", "error"] = "skip"  # skip and count (run_summary.json), or stop
    allow_images_outside_root: bool = False
    max_train_samples: int | None = Field(default=None, ge=1)  # the first N usable samples of train_file

    def path(self, name: str) -> Path:
        path = Path(name)
        return path if path.is_absolute() else Path(self.dir) / path

    def image_root_path(self) -> Path:
        return self.path(self.image_root) if self.image_root else Path(self.dir)


class BaseTrainSection(StrictSection):
    """The optimisation keys every stage has; `vlkit.train.arguments` turns them into `TrainingArguments`."""

    epochs: float = Field(default=1, gt=0)
    max_steps: int | None = Field(default=None, ge=1)  # overrides epochs
    batch_size: int = Field(default=8, ge=1)  # per process
    # batch_size is the most tried: where a step runs out of memory, the Trainer starts over with 0.9x the
    # batch until one fits (transformers' auto_find_batch_size); one process only.
    auto_find_batch_size: bool = False
    gradient_accumulation_steps: int = Field(default=1, ge=1)
    learning_rate: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    warmup_ratio: float = Field(default=0.0, ge=0, lt=1)  # linear warmup over this fraction of all steps
    warmup_steps: int | None = Field(default=None, ge=0)  # or over this many optimizer steps (wins when set)
    lr_scheduler: str = "cosine"
    max_grad_norm: float | None = 1.0
    seed: int = 0
    logging_steps: int = Field(default=10, ge=1)
    save_steps: int | None = Field(default=None, ge=1)  # None: only the final model
    save_total_limit: int | None = Field(default=2, ge=1)  # checkpoints kept (the newest); null: all
    # DataLoader worker processes (image decoding and processing, collation); null: 0 on a CPU-only
    # machine, where workers would take cores from the training itself, else up to 4 per GPU.
    num_workers: int | None = Field(default=None, ge=0)
    # true, false, or auto: bf16 where the hardware computes it natively (a CUDA GPU with bf16; a CPU with
    # AVX512-BF16 or AMX, as CPU autocast), float32 elsewhere. An AVX2-only CPU emulates bf16 at ~30x the
    # time of a float32 step (vlkit/train/arguments.py).
    bf16: bool | Literal["auto"] = False
    report_to: list[str] = Field(default_factory=list)  # e.g. [tensorboard]
    # Profile this optimizer step (1-based) with torch.profiler: profile.txt (wall time, GPU busy share,
    # top operators) and profile_trace.json (the timeline) in the output dir (vlkit/train/profile.py).
    profile_step: int | None = Field(default=None, ge=1)

    @field_validator("warmup_steps", mode="before")
    @classmethod
    def _whole_steps(cls, value: Any) -> Any:
        # transformers reads a warmup_steps < 1 as a fraction; here that is warmup_ratio's job.
        if isinstance(value, float) and not value.is_integer():
            raise ValueError("counts optimizer steps; for a fraction of all steps use train.warmup_ratio")
        return value

    @model_validator(mode="after")
    def _one_warmup(self) -> BaseTrainSection:
        if self.warmup_steps is not None and "warmup_ratio" in self.model_fields_set and self.warmup_ratio > 0:
            raise ValueError("warmup_steps and warmup_ratio are both set; keep one (warmup_ratio=0 turns it off)")
        return self

    def warmup(self) -> float:
        """Warmup as `TrainingArguments.warmup_steps` takes it: steps if >= 1, else a fraction of all steps."""
        return self.warmup_steps if self.warmup_steps is not None else self.warmup_ratio


# --- the align / instruct schema -------------------------------------------------------------------
class ModelSection(StrictSection):
    vision: str | None = None  # HF vision folder / hub id, or a CLIP run's output folder
    llm: str | None = None  # causal LM folder / hub id, or "smollm2-135m-instruct"
    connector: dict[str, Any] | None = None  # {type: mlp, depth: 2}; default mlp
    vision_feature_layer: int = -2
    vision_feature_select_strategy: Literal["default", "full"] = "default"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # unset with init_from: that run's dtype
    attn_implementation: str | None = None
    # The system turn of conversations that bring none; null keeps the LLM template's default.
    system_prompt: str | None = None

    @model_validator(mode="after")
    def _connector_has_type(self) -> ModelSection:
        if self.connector is not None and "type" not in self.connector:
            raise ValueError("connector needs a 'type' (linear, mlp, qformer, resampler, pixel_shuffle)")
        return self


class TuneSection(StrictSection):
    """What trains besides the connector (the stage table in vlkit.train.stages limits the choice)."""

    llm: Literal["frozen", "lora", "qlora", "full"] = "frozen"
    vision: Literal["frozen", "lora", "full"] = "frozen"
    # frozen: the instruct stage keeps the connector the align stage trained (a visual_words reader).
    connector: Literal["trained", "frozen"] = "trained"
    lora_r: int = Field(default=16, ge=1)
    lora_alpha: float = Field(default=32, gt=0)
    lora_dropout: float = Field(default=0.05, ge=0, lt=1)
    lora_target_modules: list[str] | str = "all-linear"
    # LoRA on the LLM's last N decoder layers only (None: all). The backward pass then stops at the
    # lowest adapted layer, so a step costs less; the frozen layers below still read the image.
    lora_layers: int | None = Field(default=None, ge=1)
    vision_lora_target_modules: list[str] | str = Field(default_factory=lambda: ["q_proj", "v_proj"])


class DataSection(BaseDataSection):
    format: Literal["auto", "llava", "sharegpt"] = "auto"
    max_length: int | None = Field(default=1024, ge=8)
    max_val_samples: int | None = Field(default=None, ge=1)  # the first N of val_file (the end-of-run loss)
    # Compute the frozen tower's features once and reuse them (vlkit.features); None: on for align.
    cache_vision_features: bool | None = None
    # Several samples per row instead of padding, no cross-sample attention (vlkit.data.packing). `flat`:
    # the whole batch in one row with no pad tokens, its attention per sample (sdpa on one row per sample,
    # or flex_attention / flash_attention_2/3). `true` is flat where that is the least work: under flash
    # attention, and under sdpa on CPU without train.compile; rows padded to the longest sample elsewhere.
    packing: bool | Literal["flat"] = True
    # The text every sample of a batch starts with (system turn, user header) run once per batch, when
    # that takes fewer token slots than packing (vlkit.data.prefix); same loss and gradients.
    share_prefix: bool = True
    # visual_words align stage: this many more copies of every train image, each with its hue turned by a
    # random angle (vlkit.clip.augment.hue_rotate). On those copies the slots whose words include one of
    # `colour_words` are not scored, so every other slot (shape, size, count) is learnt in all hues and
    # cannot lean on colour: the reader then names shapes of colour x shape pairs it never trained on.
    hue_rotated_copies: int = Field(default=0, ge=0)
    colour_words: list[str] = Field(default_factory=list)

    @field_validator("packing", mode="before")
    @classmethod
    def _packing_value(cls, value: Any) -> Any:
        if value not in (True, False, "flat"):
            raise ValueError("data.packing is true, false or flat")
        return value

    @model_validator(mode="after")
    def _copies_need_colour_words(self) -> DataSection:
        if self.hue_rotated_copies and not self.colour_words:
            raise ValueError("hue_rotated_copies change the colours the words name; list them in data.colour_words "
                             "so those slots go unscored on the copies")
        return self


class TrainSection(BaseTrainSection):
    llm_learning_rate: float | None = Field(default=None, gt=0)  # default: learning_rate (the connector's)
    vision_learning_rate: float | None = Field(default=None, gt=0)  # default: learning_rate
    warmup_ratio: float = Field(default=0.03, ge=0, lt=1)
    eval_steps: int | None = Field(default=None, ge=1)
    gradient_checkpointing: bool = False
    # torch.compile the LLM's decoder layers, one region per layer (vlkit/train/compile.py): the same
    # results, a compile on the first step, then faster steps (1.02-1.05x align, 1.16-1.21x LoRA instruct on CPU).
    compile: bool = False
    # How the LLM's loss averages: over answer tokens (the LLM's own loss); over answer turns, so that a
    # one-word reply weighs as much as a twenty-token description in the same batch; or `square`
    # (InternVL 2.5's square averaging), each turn weighing the square root of its length.
    loss_average: Literal["token", "turn", "square"] = "token"
    report_to: list[str] = Field(default_factory=lambda: ["tensorboard"])


class VlmRecipe(StrictSection):
    stage: Literal["align", "instruct"]
    output_dir: str
    init_from: str | None = None  # the run dir this stage continues (e.g. the align run)
    resume: bool | str = False  # true: latest checkpoint in output_dir; or a checkpoint path
    overwrite: bool = False  # replace a finished run in output_dir
    model: ModelSection = Field(default_factory=ModelSection)
    tune: TuneSection = Field(default_factory=TuneSection)
    data: DataSection
    train: TrainSection = Field(default_factory=TrainSection)

    @model_validator(mode="after")
    def _compile_without_4bit(self) -> VlmRecipe:
        if self.train.compile and self.tune.llm == "qlora":
            raise ValueError("train.compile does not compile bitsandbytes' 4-bit layers (tune.llm: qlora); set "
                             "train.compile=false, or use tune.llm: lora")
        return self

    @model_validator(mode="after")
    def _flat_packing_with_a_varlen_kernel(self) -> VlmRecipe:
        if self.data.packing != "flat":
            return self
        from vlkit.data.packing import VARLEN_ATTENTION

        attention = self.model.attn_implementation or "sdpa"
        if attention not in (*VARLEN_ATTENTION, "sdpa"):
            raise ValueError(f"data.packing: flat needs model.attn_implementation: sdpa (run per sample) or "
                             f"{' or '.join(VARLEN_ATTENTION)} (with {attention}, one row of the whole batch would "
                             "attend through a full mask); set it, or use data.packing: true")
        if attention == "sdpa" and self.train.compile:
            raise ValueError("data.packing: flat runs sdpa per sample (one row each), which train.compile does not compile; "
                             "use data.packing: true (rows when compiled), or a variable-length kernel "
                             f"(model.attn_implementation: {' or '.join(VARLEN_ATTENTION)})")
        return self


def dump_recipe(recipe: BaseModel) -> str:
    """The resolved recipe as YAML (written into every run dir)."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
