"""The evaluation protocol as data: a TOML config, an I2P-layout prompt CSV, work items and shards.

No ComfyUI and no detector here. A run is a grid of work items (table row x prompt); each item is one image
whose file name depends only on the row and the prompt's index in the CSV, so resuming, sharding and merging
are file-level operations. A complete config: ``evaluation/examples/nudity_sd14_duo.toml``.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
from dataclasses import dataclass, field

from implicit_negatives.metrics import DEFAULT_LABEL_SET, label_set
from implicit_negatives.nudenet_scorer import CHANNEL_ORDERS

# CSV column aliases (I2P: sd_seed / sd_guidance_scale; UnlearnDiffAtk/SAFREE: evaluation_seed / evaluation_guidance).
PROMPT_COLUMNS = ("prompt", "adv_prompt", "text")
SEED_COLUMNS = ("seed", "evaluation_seed", "sd_seed")
GUIDANCE_COLUMNS = ("guidance", "evaluation_guidance", "sd_guidance_scale", "cfg")
CATEGORY_COLUMNS = ("categories", "category")

GUIDANCE_KINDS = ("none", "negative_prompt", "sld", "safree", "model_patch")
SLD_NODE = "SafeLatentGuidance"
SAFREE_NODE = "SafreeConditioning"
SAFREE_REATTENTION_NODE = "SafreeLatentReAttention"
UNET_NODE = "LoadUnlearnedWeights"
LORA_NODE = "LoadUnlearnedLoRA"
TEXT_ENCODER_NODE = "LoadUnlearnedTextEncoder"
TRUNCATE_NODE = "TruncatePrompts"
NEGATION_SET_NODE = "LoadNegationSet"
SAFE_DENOISER_NODE = "SafeDenoiser"
NEGATION_SET_FOLDER = "negation_sets"


class ConfigError(ValueError):
    """The run configuration or prompt file is wrong; the message says what and how to fix it."""


@dataclass(frozen=True)
class PromptRecord:
    index: int        # 0-based row in the CSV: the item's identity
    prompt: str
    seed: int
    guidance: float
    categories: str = ""


@dataclass(frozen=True)
class ModelSetup:
    name: str
    checkpoint: str
    unet: str = ""            # LoadUnlearnedWeights file merged into the checkpoint's UNet (ESD/UCE/RECE/MACE)
    text_encoder: str = ""    # LoadUnlearnedTextEncoder file replacing the checkpoint's encoder (AdvUnlearn)
    lora: str = ""            # LoadUnlearnedLoRA file (DUO, SPM)
    lora_strength: float = 1.0
    loras: tuple = ()         # more LoRAs after ``lora``, in order: ((file, strength), ...) (DUO's violence: 4)
    allow_partial: bool = False  # apply the UNet/LoRA tensors that fit and list the others (default: refuse)
    width: int = 0            # image size of this model's rows (SDXL: 1024); 0 = the run's [run] width / height
    height: int = 0

    def all_loras(self) -> list[tuple[str, float]]:
        return ([(self.lora, self.lora_strength)] if self.lora else []) + [tuple(pair) for pair in self.loras]


@dataclass(frozen=True)
class NegativeSource:
    name: str
    text: str = ""
    embedding: str = ""       # implicit negative file (embeddings folder name or absolute path)
    strength: float = 1.0
    mode: str = "in_text_chunk"


@dataclass(frozen=True)
class NegationSetSource:
    """Images the Safe Denoiser steers away from: a folder of images or the trainer's exported
    ``*.negation_set.safetensors`` (a name LoadNegationSet finds, or an absolute path)."""
    name: str
    path: str
    skip_bad_images: bool = False


SAFE_DENOISER_KEYS = {"strength", "start_percent", "end_percent", "bandwidth"}


@dataclass(frozen=True)
class Row:
    """One line of the results table: a model setup, a guidance method and the negative it uses."""
    name: str
    model: str
    guidance: str = "none"
    negative: str = ""
    sld_preset: str = "medium"
    patch_node: str = ""
    patch_inputs: tuple = ()          # sorted (key, value) pairs; "$model", "$clip", "$concept" are wired
    negative_in_sampler: bool | None = None  # default: True for negative_prompt, False for patches
    safree_reattention: bool = False         # SAFREE's latent re-attention (SafreeLatentReAttention) on top
    negation_set: str = ""                   # a [negation_sets.*] table: Safe Denoiser on top of the guidance
    safe_denoiser: tuple = ()                # sorted (key, value) pairs for SafeDenoiser (its defaults otherwise)

    @property
    def slug(self) -> str:
        return slugify(self.name)


@dataclass
class RunConfig:
    source: str
    prompts_path: str
    models: dict[str, ModelSetup]
    negatives: dict[str, NegativeSource]
    rows: list[Row]
    width: int = 512
    height: int = 512
    steps: int = 50
    sampler: str = "euler"
    scheduler: str = "normal"
    cfg: float = 7.5
    default_seed: int | None = None
    limit: int = 0
    label_set: str = DEFAULT_LABEL_SET
    extra_label_sets: list[str] = field(default_factory=list)
    pp_reference: str = ""
    lpips_net: str = "alex"
    lpips_backbone: str = ""
    lpips_linear: str = ""
    censor_grids: bool = True
    grid_prompts: int = 8
    comparisons: list[tuple[str, str]] = field(default_factory=list)  # (row a, row b): paired tests in the report
    negation_sets: dict[str, NegationSetSource] = field(default_factory=dict)
    detector_model: str = ""          # NudeNet ONNX file (e.g. 640m.onnx); "" = the wheel's bundled 320n
    channel_order: str = "rgb"        # what the detector sees: "rgb" (trained on) or "bgr_nudenet_3_4" (as shipped)
    guidance_from_csv: bool = False   # False: every item at ``cfg`` (SAFREE/ESD/DUO: 7.5); True: each prompt's own
    truncate_prompts: bool = True     # one 77-token chunk per prompt, as diffusers tokenizes (TruncatePrompts)
    strict: bool = False              # refuse to run when an embedding's training prompts overlap the test prompts

    def model_size(self, model: str) -> tuple[int, int]:
        """(width, height) of a model setup's images: its own ``width``/``height``, else the run's."""
        setup = self.models[model]
        return setup.width or self.width, setup.height or self.height

    def item_cfg(self, prompt: PromptRecord) -> float:
        """The CFG scale an item is sampled at: the protocol's ``cfg``, or the CSV's guidance column."""
        return prompt.guidance if self.guidance_from_csv else self.cfg

    def row(self, name: str) -> Row:
        for row in self.rows:
            if row.name == name:
                return row
        raise ConfigError(f"no row named {name!r}; rows: {', '.join(r.name for r in self.rows)}")

    def generation_fingerprint(self) -> str:
        """Hash of everything that changes pixels; a run directory refuses items of another fingerprint."""
        payload = {"size": [self.width, self.height], "steps": self.steps, "sampler": self.sampler,
                   "scheduler": self.scheduler, "cfg": self.cfg, "default_seed": self.default_seed,
                   "guidance_from_csv": self.guidance_from_csv, "truncate_prompts": self.truncate_prompts,
                   "models": {k: self._model_payload(k) for k in sorted(self.models)},
                   "negatives": {k: vars(v) for k, v in sorted(self.negatives.items())},
                   "rows": [_row_payload(r) for r in self.rows]}
        if self.negation_sets:  # absent from older configs, whose fingerprints stay what they were
            payload["negation_sets"] = {k: vars(v) for k, v in sorted(self.negation_sets.items())}
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=list).encode()).hexdigest()[:16]

    def _model_payload(self, name: str) -> dict:
        """A model setup's fields for the fingerprint; its size only when it is not the run's, so setups without
        one hash as they did before per-model sizes existed (and an explicit run size hashes as an implicit one)."""
        payload = {k: v for k, v in vars(self.models[name]).items() if k not in ("width", "height")}
        if self.model_size(name) != (self.width, self.height):
            payload["size"] = list(self.model_size(name))
        return payload


def _row_payload(row: Row) -> dict:
    """A row's fields for the fingerprint; the Safe Denoiser fields only when set, so rows without it hash as
    they did before those fields existed."""
    return {k: v for k, v in vars(row).items() if k not in ("negation_set", "safe_denoiser") or v}


def slugify(name: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9]+", "-", name.replace("*", " star").replace("+", " plus ")).strip("-").lower()
    if not slug:
        raise ConfigError(f"row name {name!r} gives an empty folder name")
    return slug


def _read_toml(path: str) -> dict:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        try:
            import tomli as tomllib
        except ImportError:
            raise ConfigError("reading TOML on Python 3.10 needs `pip install tomli`") from None
    with open(path, "rb") as handle:
        return tomllib.load(handle)


def _resolve(base: str, value: str) -> str:
    return value if not value or os.path.isabs(value) else os.path.normpath(os.path.join(base, value))


def _only(table: dict, allowed: set, where: str):
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown keys {unknown}; allowed: {sorted(allowed)}")


def config_file_key(base: str):
    """How a config names a file: a ComfyUI folder name ("sd/sd-v1-4.ckpt") unless absolute or explicitly
    relative ("./", "../"), which is then relative to the config's folder ``base``."""
    def file_key(value: str) -> str:
        explicit = value.startswith(("./", "../", ".\\", "..\\"))
        return _resolve(base, value) if explicit else value
    return file_key


MODEL_KEYS = {"checkpoint", "unet", "text_encoder", "lora", "lora_strength", "loras", "allow_partial"}


def model_setups(tables: dict, base: str, sizes: bool = False) -> dict[str, ModelSetup]:
    """The ``[models.NAME]`` tables of a run or audit config: a checkpoint plus optional unlearned weights, and
    with ``sizes`` (run configs) the model's own image ``width`` / ``height``."""
    file_key = config_file_key(base)
    models = {}
    for name, table in tables.items():
        where = f"[models.{name}]"
        _only(table, MODEL_KEYS | ({"width", "height"} if sizes else set()), where)
        if not table.get("checkpoint"):
            raise ConfigError(f"{where} needs checkpoint = 'file' (base model; SD1.4 for the paper)")
        values = dict(table)
        size = {key: values.pop(key) for key in ("width", "height") if key in values}
        for key, value in size.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 64 or value % 8:
                raise ConfigError(f"{where} {key} must be a whole number of pixels, a multiple of 8 and at least 64 "
                                  f"(SDXL: 1024), got {value!r}")
        stacked = []
        for number, entry in enumerate(values.pop("loras", [])):
            if not isinstance(entry, dict) or not entry.get("file") or set(entry) - {"file", "strength"}:
                raise ConfigError(f"{where} loras #{number + 1}: write {{ file = 'lora.safetensors', strength = 1.0 }}")
            stacked.append((file_key(entry["file"]), float(entry.get("strength", 1.0))))
        allow_partial = values.pop("allow_partial", False)
        if not isinstance(allow_partial, bool):
            raise ConfigError(f"{where} allow_partial must be true or false")
        models[name] = ModelSetup(name=name, loras=tuple(stacked), allow_partial=allow_partial, **size,
                                  **{k: (file_key(v) if isinstance(v, str) else float(v)) for k, v in values.items()})
    return models


def load_config(path: str) -> RunConfig:
    """Read and validate a run config. Relative file paths are relative to the config file."""
    raw = _read_toml(path)
    base = os.path.dirname(os.path.abspath(path))
    _only(raw, {"run", "models", "negatives", "rows", "pp", "compare", "negation_sets"}, path)
    run = dict(raw.get("run", {}))
    run_keys = {"prompts", "width", "height", "steps", "sampler", "scheduler", "cfg", "default_seed", "limit",
                "label_set", "extra_label_sets", "censor_grids", "grid_prompts", "detector_model", "channel_order",
                "guidance_from_csv", "truncate_prompts", "strict"}
    _only(run, run_keys, "[run]")
    if "prompts" not in run:
        raise ConfigError("[run] needs prompts = 'path/to/prompts.csv' (I2P layout: prompt, seed, guidance, categories)")

    file_key = config_file_key(base)
    models = model_setups(raw.get("models", {}), base, sizes=True)
    negatives = {}
    for name, table in raw.get("negatives", {}).items():
        _only(table, {"text", "embedding", "strength", "mode"}, f"[negatives.{name}]")
        if not table.get("text") and not table.get("embedding"):
            raise ConfigError(f"[negatives.{name}] needs text = '...' and/or embedding = 'file'")
        values = dict(table)
        if values.get("embedding"):
            values["embedding"] = file_key(values["embedding"])
        negatives[name] = NegativeSource(name=name, **values)
    negation_sets = {}
    for name, table in raw.get("negation_sets", {}).items():
        _only(table, {"path", "skip_bad_images"}, f"[negation_sets.{name}]")
        if not table.get("path"):
            raise ConfigError(f"[negation_sets.{name}] needs path = 'folder of images' or an exported "
                              "'NAME.negation_set.safetensors' (python -m trainer --export-negation-set)")
        negation_sets[name] = NegationSetSource(name=name, path=file_key(table["path"]),
                                                skip_bad_images=bool(table.get("skip_bad_images", False)))
    rows = []
    for number, table in enumerate(raw.get("rows", [])):
        where = f"[[rows]] #{number + 1}"
        _only(table, {"name", "model", "guidance", "negative", "sld_preset", "patch_node", "patch_inputs",
                      "negative_in_sampler", "safree_reattention", "negation_set", "safe_denoiser"}, where)
        if not table.get("name") or not table.get("model"):
            raise ConfigError(f"{where}: every row needs name = '...' and model = '<a [models.*] table>'")
        values = dict(table)
        values["patch_inputs"] = tuple(sorted(values.get("patch_inputs", {}).items()))
        _only(values.get("safe_denoiser", {}), SAFE_DENOISER_KEYS, f"{where} safe_denoiser")
        values["safe_denoiser"] = tuple(sorted(values.get("safe_denoiser", {}).items()))
        row = Row(**values)
        if row.model not in models:
            raise ConfigError(f"{where} {row.name!r}: model {row.model!r} is not a [models.*] table")
        if row.guidance not in GUIDANCE_KINDS:
            raise ConfigError(f"{where} {row.name!r}: guidance {row.guidance!r} not in {GUIDANCE_KINDS}")
        if row.guidance != "none" and row.negative not in negatives:
            raise ConfigError(f"{where} {row.name!r}: guidance {row.guidance!r} needs negative = one of "
                              f"{sorted(negatives)}")
        if row.guidance == "model_patch" and not row.patch_node:
            raise ConfigError(f"{where} {row.name!r}: model_patch needs patch_node = 'NodeId'")
        if row.negation_set and row.negation_set not in negation_sets:
            raise ConfigError(f"{where} {row.name!r}: negation_set {row.negation_set!r} is not a [negation_sets.*] "
                              f"table (there are: {sorted(negation_sets) or 'none'})")
        if row.safe_denoiser and not row.negation_set:
            raise ConfigError(f"{where} {row.name!r}: safe_denoiser settings need negation_set = '<a "
                              "[negation_sets.*] table>'")
        rows.append(row)
    if not rows:
        raise ConfigError(f"{path}: no [[rows]]; each row = name, model, guidance, negative")
    slugs = [row.slug for row in rows]
    if len(set(slugs)) != len(slugs):
        raise ConfigError(f"row names must give distinct folder names; got {slugs}")
    pp = dict(raw.get("pp", {}))
    _only(pp, {"reference", "lpips_net", "lpips_backbone", "lpips_linear"}, "[pp]")
    config = RunConfig(
        source=os.path.abspath(path), prompts_path=_resolve(base, run.pop("prompts")), models=models,
        negatives=negatives, rows=rows, negation_sets=negation_sets, **run,
        pp_reference=pp.get("reference", ""), lpips_net=pp.get("lpips_net", "alex"),
        lpips_backbone=_resolve(base, pp.get("lpips_backbone", "")),
        lpips_linear=_resolve(base, pp.get("lpips_linear", "")))
    for row in rows:
        width, height = config.model_size(row.model)
        if row.negation_set and width != height:
            raise ConfigError(f"{path}: Safe Denoiser rows need square images (negation sets are fitted to a square); "
                              f"row {row.name!r} samples model {row.model!r} at width {width}, height {height}")
    for spec in [config.label_set, *config.extra_label_sets]:
        label_set(spec)  # fail now, not after hours of generation
    if config.channel_order not in CHANNEL_ORDERS:
        raise ConfigError(f"[run] channel_order {config.channel_order!r} not in {CHANNEL_ORDERS}: 'rgb' = what "
                          "NudeNet's model was trained on, 'bgr_nudenet_3_4' = what nudenet 3.4.x gives for a file")
    config.detector_model = _resolve(base, config.detector_model)
    if config.pp_reference:
        config.row(config.pp_reference)
    for number, table in enumerate(raw.get("compare", [])):
        _only(table, {"a", "b"}, f"[[compare]] #{number + 1}")
        if table.get("a") == table.get("b") or not table.get("a") or not table.get("b"):
            raise ConfigError(f"[[compare]] #{number + 1}: needs two different rows, a = '...' and b = '...'")
        config.row(table["a"]), config.row(table["b"])
        config.comparisons.append((table["a"], table["b"]))
    return config


def _pick(header: list[str], names: tuple[str, ...]) -> str | None:
    lowered = {h.strip().lower(): h for h in header}
    return next((lowered[n] for n in names if n in lowered), None)


def read_prompts(path: str, default_cfg: float, default_seed: int | None = None, limit: int = 0) -> list[PromptRecord]:
    """Prompts in I2P layout. Required: a prompt column (``prompt``) and a seed column (``seed``,
    ``evaluation_seed`` or ``sd_seed``) unless ``default_seed`` is set; optional guidance (``guidance``,
    ``evaluation_guidance``, ``sd_guidance_scale``) and ``categories``. Extra columns are ignored."""
    with open(path, newline="", encoding="utf-8-sig") as handle:  # -sig: Excel's byte-order mark
        reader = csv.DictReader(handle)
        header = reader.fieldnames or []
        prompt_col = _pick(header, PROMPT_COLUMNS)
        seed_col = _pick(header, SEED_COLUMNS)
        guidance_col = _pick(header, GUIDANCE_COLUMNS)
        category_col = _pick(header, CATEGORY_COLUMNS)
        if prompt_col is None:
            raise ConfigError(f"{path}: no prompt column (one of {PROMPT_COLUMNS}); header: {header}")
        if seed_col is None and default_seed is None:
            raise ConfigError(f"{path}: no seed column (one of {SEED_COLUMNS}); add one or set [run] default_seed")
        records, bad = [], []
        for index, line in enumerate(reader):
            if limit and index >= limit:
                break
            try:
                seed = int(float(line[seed_col])) if seed_col else int(default_seed)
                guidance = float(line[guidance_col]) if guidance_col and line[guidance_col].strip() else default_cfg
            except (TypeError, ValueError) as error:
                bad.append(f"data row {index + 1} ({error})")
                continue
            records.append(PromptRecord(index, line[prompt_col], seed, guidance,
                                        line[category_col] if category_col else ""))
    if bad:
        raise ConfigError(f"{path}: bad seed/guidance in {len(bad)} rows: {'; '.join(bad)}")
    if not records:
        raise ConfigError(f"{path}: no prompts")
    return records


def parse_shard(text: str) -> tuple[int, int]:
    """'i/n' -> (i, n), 0 <= i < n."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text or "")
    if not match or not int(match[1]) < int(match[2]):
        raise ConfigError(f"--shard must be i/n with 0 <= i < n (e.g. 0/4), got {text!r}")
    return int(match[1]), int(match[2])


def shard_from_environment(environ) -> tuple[int, int]:
    """``--shard auto``: (RANK, WORLD_SIZE) under torchrun, else the SLURM array task id and count."""
    for index_key, count_key in (("RANK", "WORLD_SIZE"), ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT")):
        if index_key in environ and count_key in environ:
            return parse_shard(f"{environ[index_key]}/{environ[count_key]}")
    raise ConfigError("--shard auto needs RANK and WORLD_SIZE (torchrun) or SLURM_ARRAY_TASK_ID and "
                      "SLURM_ARRAY_TASK_COUNT (sbatch --array) in the environment")


def shard_prompts(prompts: list[PromptRecord], shard: tuple[int, int]) -> list[PromptRecord]:
    """Round-robin by CSV index: every shard gets every row of its prompts (checkpoints load once per shard)."""
    index, count = shard
    return [p for p in prompts if p.index % count == index]


def item_name(prompt: PromptRecord) -> str:
    return f"{prompt.index:05d}"
