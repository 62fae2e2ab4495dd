"""Transformers models as targets: the class a model folder's config names, built from that config on the meta
device, and the tensors `save_pretrained` writes for a model (its on-disk layout).

transformers 5 keeps some classes in one layout and their files in another (MoE experts fused in the class,
stored per expert on disk; `conversion_mapping.py`); a model folder holds the file layout, so a folder target is
the layout `save_pretrained` would write, asked of transformers itself for the meta-built model (no model family
is hard-coded here). A config is data: only transformers' own classes are built from it, never `auto_map` code.
"""

from __future__ import annotations

import importlib
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ckptx._lazy import lazy_module
from ckptx.errors import TargetError
from ckptx.io.read.gguf_reader import GgufSource
from ckptx.io.read.model_folder import CONFIG, PARAMS, read_json_document
from ckptx.targets.config_fields import check_overrides

GGUF_SUFFIX = ".gguf"

if TYPE_CHECKING:  # pragma: no cover
    import torch
else:
    torch = lazy_module("torch")

__all__ = [
    "GGUF_SUFFIX",
    "ModelConfig",
    "build_from_config",
    "config_path",
    "gguf_to_hf",
    "is_gguf_file",
    "load_model_config",
    "meta_params_to_hf",
    "saved_state",
]


@dataclass(frozen=True)
class ModelConfig:
    """A model folder's config made ready to build: the document to write as `config.json` (the source's fields,
    the overrides applied), the class it names, and the folder it came from (whose other files go along)."""

    document: dict[str, Any]
    architecture: str
    file: Path
    folder: Path


def config_path(spec: str | Path) -> Path | None:
    """The config document a `--target` names: `DIR/` (holding config.json or params.json), `DIR/config.json` or
    `DIR/params.json`; None when it names none of these."""
    path = Path(spec)
    if path.is_dir():
        for name in (CONFIG, PARAMS):
            if (path / name).is_file():
                return path / name
        return None
    return path if path.name in (CONFIG, PARAMS) else None


def load_model_config(
    spec: str | Path, overrides: Mapping[str, Any] | None = None, *, where: str = "target"
) -> ModelConfig:
    """The config document of a model folder with `overrides` applied to its fields (each must be a field of the
    config class: an unknown one is an error with the closest name); Meta's params.json is translated to the
    LlamaForCausalLM config Meta's own converter writes."""
    file = Path(spec) if is_gguf_file(spec) else config_path(spec)
    if file is None:
        raise TargetError(f"{where}: {spec}: holds no config.json (or Meta's params.json); give a model folder")
    if file.suffix.lower() == GGUF_SUFFIX:
        document = gguf_to_hf(file)
    else:
        document = dict(read_json_document(file))
    if file.name == PARAMS:
        document = meta_params_to_hf(document, str(file))
    architectures = document.get("architectures")
    if not (isinstance(architectures, list) and architectures and isinstance(architectures[0], str)):
        raise TargetError(
            f'{file}: names no model class ("architectures": [...]); add one, e.g. "architectures": '
            f'["LlamaForCausalLM"], or give --target module:callable'
        )
    architecture = architectures[0]
    config_class = _config_class(architecture, str(file))
    document.update(check_overrides(config_class, document, dict(overrides or {}), where))
    return ModelConfig(document, architecture, file, file.parent)


def is_gguf_file(spec: str | Path) -> bool:
    """A GGUF file (llama.cpp), whose metadata describes a LlamaForCausalLM config."""
    path = Path(spec)
    return path.suffix.lower() == GGUF_SUFFIX and path.is_file()


def gguf_to_hf(file: Path) -> dict[str, Any]:
    """The LlamaForCausalLM config a GGUF file's metadata describes (io/read/gguf_llama.py); TargetError naming
    the file and each problem when it is not a Llama that LlamaForCausalLM computes exactly."""
    source = GgufSource(file)
    try:
        config = source.hf_config()
    finally:
        source.close()
    if config.problems:
        raise TargetError(
            f"{file}: its metadata does not describe a LlamaForCausalLM: {'; '.join(config.problems)}; "
            f"give the model's own config with --target DIR/ (a folder holding its config.json)"
        )
    return config.document


def build_from_config(config: ModelConfig, *, device: str = "meta") -> torch.nn.Module:
    """The transformers class the config names, built from it (randomly initialised) on `device`."""
    model_class = _model_class(config.architecture, str(config.file))
    config_class = model_class.config_class
    fields = {k: v for k, v in config.document.items() if k not in ("auto_map", "transformers_version")}
    too_many = _too_many_modules(fields)
    if too_many:
        raise TargetError(
            f"{config.file}: {too_many}; no published model comes near that, and building it would not end (fix "
            f"the config, or give --target the model's real config)"
        )
    try:
        hf_config = config_class.from_dict(fields)
        with torch.device(device):
            return model_class(hf_config)
    except Exception as exc:  # noqa: BLE001 - transformers refusing a config is the config's problem
        raise TargetError(
            f"{config.file}: transformers cannot build {config.architecture} from it: {type(exc).__name__}: {exc}"
        ) from None


_LAYER_KEY = re.compile(r"^(num_|n_)?(hidden_|encoder_|decoder_)?layers?$")
MAX_LAYERS = 1_000  # the deepest published transformers have about 200 blocks
MAX_EXPERTS = 10_000  # the largest mixtures of experts have a few hundred per layer


def _too_many_modules(document: Mapping[str, Any], where: str = "", depth: int = 0) -> str | None:
    """The first count in a config (or its text/vision sub-configs) that would make a model of more modules than
    any real one: a hostile config.json stating 2^32 layers would otherwise be built, module by module, forever."""
    for key, value in document.items():
        if isinstance(value, Mapping) and depth < 4:
            found = _too_many_modules(value, f"{where}{key}.", depth + 1)
            if found:
                return found
        if isinstance(value, bool) or not isinstance(value, int):
            continue
        if _LAYER_KEY.match(str(key)) and value > MAX_LAYERS:
            return f"{where}{key} is {value} (ckptx builds models of at most {MAX_LAYERS:,} layers)"
        if str(key).endswith("experts") and value > MAX_EXPERTS:
            return f"{where}{key} is {value} (ckptx builds models of at most {MAX_EXPERTS:,} experts per layer)"
    return None


def saved_state(model: Any, *, file_names: bool = True) -> dict[str, Any]:
    """The tensors `save_pretrained` writes for `model` (meta tensors are fine): without keys it ignores on save,
    tied weights once, in the file layout of classes with a conversion mapping (with `file_names=False`, under the
    class's own names). A model that is not a transformers model, or a transformers without these functions,
    gives its `state_dict()`."""
    state = model.state_dict()
    try:
        from transformers import PreTrainedModel
        from transformers.core_model_loading import revert_weight_conversion
        from transformers.modeling_utils import remove_tied_weights_from_state_dict
    except ImportError:
        return dict(state)
    if not isinstance(model, PreTrainedModel):
        return dict(state)
    ignore = set(getattr(model, "_keys_to_ignore_on_save", None) or ())
    state = {k: v for k, v in state.items() if k not in ignore}
    state = remove_tied_weights_from_state_dict(state, model)
    return dict(revert_weight_conversion(model, state)) if file_names else dict(state)


def meta_params_to_hf(params: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Meta's `params.json` (llama-models `ModelArgs`) as the LlamaForCausalLM config transformers'
    `convert_llama_weights_to_hf.py` writes: the feed-forward size worked out as Meta's `FeedForward` does, rotary
    scaling as Llama 3.1's, Llama 3's special token ids when the vocabulary is Llama 3's."""
    try:
        dim, n_layers, n_heads = int(params["dim"]), int(params["n_layers"]), int(params["n_heads"])
    except (KeyError, TypeError, ValueError) as exc:
        raise TargetError(f"{where}: not a Meta params.json: needs integer dim, n_layers and n_heads ({exc})") from None
    vocab_size = int(params.get("vocab_size", -1) or -1)
    if vocab_size <= 0:
        raise TargetError(
            f"{where}: vocab_size is {vocab_size} (Llama 2 left it to the tokenizer); pass --target-arg vocab_size=N"
        )
    multiple_of = int(params.get("multiple_of", 256))
    hidden = int(2 * 4 * dim / 3)
    if params.get("ffn_dim_multiplier") is not None:
        hidden = int(float(params["ffn_dim_multiplier"]) * hidden)
    intermediate = multiple_of * math.ceil(hidden / multiple_of)
    theta = float(params.get("rope_theta", 500000.0))
    scaled = bool(params.get("use_scaled_rope", False))
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": theta}
    if scaled:
        rope = {
            "rope_type": "llama3",
            "rope_theta": theta,
            "factor": float(params.get("rope_scaling_factor", 8.0)),
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        }
    document: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": dim,
        "intermediate_size": intermediate,
        "num_hidden_layers": n_layers,
        "num_attention_heads": n_heads,
        "num_key_value_heads": int(params.get("n_kv_heads") or n_heads),
        "head_dim": dim // n_heads,
        "vocab_size": vocab_size,
        "rms_norm_eps": float(params.get("norm_eps", 1e-5)),
        "rope_parameters": rope,
        "max_position_embeddings": 131072 if scaled else 8192,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
    }
    if vocab_size == 128256:  # Llama 3's tokenizer: <|begin_of_text|>, <|end_of_text|>
        document.update(bos_token_id=128000, eos_token_id=128001)
    return document


def _model_class(architecture: str, where: str) -> Any:
    transformers = importlib.import_module("transformers")
    model_class = getattr(transformers, architecture, None)
    if not isinstance(model_class, type) or not issubclass(model_class, transformers.PreTrainedModel):
        raise TargetError(
            f"{where}: names the model class '{architecture}', which transformers {transformers.__version__} does "
            f"not have (ckptx builds transformers' own classes only, never a folder's custom code)"
        )
    if getattr(model_class, "config_class", None) is None:
        raise TargetError(f"{where}: transformers' {architecture} names no config class")
    return model_class


def _config_class(architecture: str, where: str) -> type:
    config_class: type = _model_class(architecture, where).config_class
    return config_class
