"""The Python API says what the CLI says (loralab's own warnings) and nothing the user cannot act on (the
deprecation notices transformers and PEFT raise inside loralab's calls)."""

from __future__ import annotations

import warnings

from conftest import write_config

from loralab.config import ConfigWarning, load_config
from loralab.stages import prepare, train

LIBRARIES = ("transformers", "peft", "accelerate")


def test_stages_through_the_api_show_loralab_warnings_and_no_library_deprecations(tmp_path, tiny_model_dir,
                                                                                  alpaca_path):
    path = write_config(tmp_path / "exp.yaml", model={"name_or_path": str(tiny_model_dir)},
                        data={"path": str(alpaca_path)})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg = load_config(path)  # 4 steps logged every step: too few points to judge, said as a ConfigWarning
        prepare.run(cfg)
        train.run(cfg)
    ours = [w for w in caught if issubclass(w.category, ConfigWarning)]
    assert any("loss points" in str(w.message) for w in ours)
    noise = [f"{w.category.__name__}: {w.message} ({w.filename})" for w in caught
             if issubclass(w.category, (FutureWarning, DeprecationWarning))
             and any(f"/{lib}/" in w.filename.replace("\\", "/") for lib in LIBRARIES)]
    assert noise == []
