"""`loralab merge`: the adapter merged into the base weights, saved as a plain transformers model folder.

The folder (safetensors weights in the base checkpoint's dtype, tokenizer with its chat template, generation
config, a model card and loralab_manifest.json) loads with ``AutoModelForCausalLM.from_pretrained`` alone.
It is built in a temporary folder beside the destination and swapped in at the end, so a failure leaves
nothing half-written.
"""

from __future__ import annotations

import datetime as _dt
import time
from pathlib import Path

from loralab.errors import hide_library_deprecations
from loralab.files import check_free_space, check_output_dir, replace_dir, write_json
from loralab.models import card as model_card
from loralab.models.adapters import (
    checkpoint_dtype,
    load_merged,
    parameter_count,
    require_adapter,
    resolve_target,
)
from loralab.models.loading import resolve_model_source
from loralab.runs.layout import RunDir

MERGED_DIR = "merged"
# Weights plus tokenizer files and the safetensors index: a little over the raw tensor bytes.
DISK_MARGIN = 1.05


@hide_library_deprecations
def run(target: str, out: str | None = None, overwrite: bool = False, overrides: list[str] | None = None) -> Path:
    """Merge the run's adapter into its base model and save the result to ``out`` (default <run>/merged)."""
    from transformers import AutoConfig

    start = time.perf_counter()
    tgt = resolve_target(target, overrides)
    require_adapter(tgt, "merge")
    dest = Path(out) if out else tgt.run_dir / MERGED_DIR
    check_output_dir(dest, overwrite, "merged model")
    config = AutoConfig.from_pretrained(resolve_model_source(tgt.model), revision=tgt.model.revision)
    dtype = checkpoint_dtype(config)
    need = int(parameter_count(config) * dtype.itemsize * DISK_MARGIN)
    check_free_space(dest.parent, need, "merged model")

    model, tokenizer = load_merged(tgt, "merge")
    rundir = RunDir(tgt.cfg)
    entry = {
        "path": str(dest.resolve()),
        "dtype": str(dtype).removeprefix("torch."),
        "base_model": tgt.model.name_or_path,
        "finished_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }

    def fill(folder: Path) -> None:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        write_json(folder / "loralab_manifest.json", {**rundir.manifest(), "merged": entry})
        model_card.write(tgt.cfg, folder / "README.md", merged_dir=dest)

    replace_dir(dest, fill)
    rundir.update_manifest(merged=entry)
    model_card.write(tgt.cfg, tgt.adapter_dir / "README.md")
    print(f"merge: {tgt.adapter_dir} + {tgt.model.name_or_path} -> {dest} ({entry['dtype']}, "
          f"{time.perf_counter() - start:.0f} s); load it with AutoModelForCausalLM.from_pretrained('{dest}')")
    return dest
