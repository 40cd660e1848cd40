"""GGUF base models: check a .gguf file, de-quantise it once through transformers, cache the result.

A GGUF file (llama.cpp, Ollama, LM Studio) holds quantised weights plus the tokenizer and chat template.
transformers reads it with ``from_pretrained(folder, gguf_file=name)`` and de-quantises to ordinary
tensors, which takes a minute; loralab does that once and keeps an ordinary safetensors model folder in
a cache keyed by the file's SHA-256, so every later stage and run loads it in seconds. The folder holds
``loralab_source.json`` (file name, hash, quantisation, architecture) for the run manifest.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from loralab.errors import LoralabError
from loralab.files import file_sha256

SOURCE_FILE = "loralab_source.json"
"""Written into every model folder loralab makes (GGUF de-quantisation, `loralab fetch`): where it came from."""


@dataclass(frozen=True)
class GgufInfo:
    file: str
    """The GGUF file's name."""
    sha256: str
    """SHA-256 of the whole file."""
    architecture: str
    """llama.cpp's architecture name (general.architecture), e.g. "llama"."""
    quantization: str
    """llama.cpp's file type name, e.g. "MOSTLY_Q4_1" (MOSTLY_F16, MOSTLY_Q8_0, ...)."""
    name: str | None
    """The model's own name in the metadata (general.name), when it has one."""


def cache_root() -> Path:
    """Where de-quantised GGUF models are kept: $LORALAB_CACHE/gguf, default ~/.cache/loralab/gguf."""
    base = os.environ.get("LORALAB_CACHE") or Path.home() / ".cache" / "loralab"
    return Path(base).expanduser() / "gguf"


def supported_architectures() -> list[str]:
    """Architectures transformers can build from a GGUF file (its mapping also holds non-architecture keys)."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    return sorted(a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ("general", "tokenizer"))


def _field(reader, key: str):
    field = reader.fields.get(key)
    return None if field is None else field.contents()


def _open_reader(path: Path):
    try:
        from gguf import GGUFReader
    except ImportError:
        raise LoralabError("reading GGUF files needs the gguf package: pip install gguf") from None
    try:
        return GGUFReader(path)
    except (ValueError, IndexError, KeyError, OSError, TypeError) as err:
        raise LoralabError(f"{path} cannot be read as GGUF ({type(err).__name__}: {err}): it is truncated or not a "
                           "GGUF file; download it again") from None


def _check_complete(reader, path: Path) -> None:
    """Every tensor's data must lie inside the file: a cut-off download otherwise fails deep in loading."""
    size = path.stat().st_size
    for tensor in reader.tensors:
        if tensor.data_offset + tensor.n_bytes > size:
            raise LoralabError(f"{path} is truncated (tensor {tensor.name} ends past the file's {size:,} bytes); "
                               "download it again")


def inspect_gguf(path: Path, sha256: str | None = None) -> GgufInfo:
    """Read and check a GGUF file's metadata: one clear error for an unsupported architecture, a
    truncated file or missing tokenizer metadata (transformers needs the vocabulary inside the file)."""
    import gguf  # optional in spirit: only GGUF base models need it

    if not path.is_file():
        raise LoralabError(f"GGUF file {path} does not exist; set model.name_or_path to a .gguf file or a model folder")
    reader = _open_reader(path)
    architecture = _field(reader, "general.architecture")
    supported = supported_architectures()
    if architecture not in supported:
        raise LoralabError(f"{path.name}: architecture '{architecture}' cannot be read from GGUF by transformers; "
                           f"supported: {', '.join(supported)}")
    _check_complete(reader, path)
    if _field(reader, "tokenizer.ggml.tokens") is None or _field(reader, "tokenizer.ggml.model") is None:
        raise LoralabError(f"{path.name} has no tokenizer metadata (tokenizer.ggml.*); use a GGUF exported with its "
                           "tokenizer, or a model folder")
    file_type = _field(reader, "general.file_type")
    try:
        quantization = gguf.LlamaFileType(file_type).name if file_type is not None else "unknown"
    except ValueError:
        quantization = f"file_type {file_type}"
    return GgufInfo(file=path.name, sha256=sha256 or file_sha256(path), architecture=architecture,
                    quantization=quantization, name=_field(reader, "general.name"))


def dequantise(path: Path, out_dir: Path, info: GgufInfo | None = None, extra_source: dict | None = None) -> Path:
    """De-quantise a GGUF file into an ordinary model folder ``out_dir`` (fp32 safetensors, tokenizer, chat
    template). Written to a temporary folder beside ``out_dir`` and renamed into place, so an interrupted
    or failed conversion leaves nothing behind."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    info = info or inspect_gguf(path)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}-"))
    try:
        print(f"gguf: de-quantising {path.name} ({info.architecture}, {info.quantization}) once; "
              "later loads take seconds")
        try:
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
            model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
        except (ValueError, KeyError, OSError, RuntimeError) as err:
            raise LoralabError(f"transformers cannot load {path.name} ({type(err).__name__}: {err})") from None
        # The weights are ordinary tensors now; only the marker of where they came from blocks saving.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        source = {"gguf": asdict(info), **(extra_source or {})}
        (tmp / SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n", encoding="utf-8")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.chmod(0o755)  # mkdtemp makes it private; a model folder is shared like any download
        tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def cached_model_folder(path: Path) -> Path:
    """The de-quantised model folder for GGUF file ``path``: from the cache, or made once and cached."""
    info = inspect_gguf(path)
    folder = cache_root() / info.sha256[:16]
    if (folder / SOURCE_FILE).exists() and (folder / "config.json").exists():
        return folder
    return dequantise(path, folder, info)


def model_source(folder: str | Path) -> dict | None:
    """What a loralab-made model folder came from (its loralab_source.json), for the run manifest."""
    file = Path(folder) / SOURCE_FILE
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
