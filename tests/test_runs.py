"""loralab.runs: the one stage protocol (require upstream, skip if current, attempt, done) and the table of stage
hashes that chains prepare -> train -> eval."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from loralab.config import config_from_dict
from loralab.errors import LoralabError
from loralab.files import atomic_write_text
from loralab.runs.fingerprints import stage_keys, tokenizer_fingerprint
from loralab.runs.layout import RunDir
from loralab.runs.protocol import Stage, StageKey, StageRecords


@pytest.fixture
def cfg(tmp_path, alpaca_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "tokenizer.json").write_text("{}")
    return config_from_dict({"name": "run", "output_dir": str(tmp_path / "out"),
                             "model": {"name_or_path": str(model)}, "data": {"path": str(alpaca_path)}})


def _prepare(rundir: RunDir, key: StageKey) -> Stage:
    stage = Stage(rundir, key)
    with stage.attempt():
        for rel in RunDir.STAGE_OUTPUTS["prepare"]:
            atomic_write_text(rundir.root / rel, "{}\n")
        stage.done(0.1)
    return stage


def test_each_setting_moves_the_stages_that_depend_on_it(cfg):
    keys = stage_keys(cfg)
    lora = stage_keys(replace(cfg, lora=replace(cfg.lora, r=16)))
    assert lora.prepare == keys.prepare and lora.train.hash != keys.train.hash and lora.eval.hash != keys.eval.hash
    evals = stage_keys(replace(cfg, eval=replace(cfg.eval, max_new_tokens=7)))
    assert evals.train == keys.train and evals.eval.hash != keys.eval.hash
    data = stage_keys(replace(cfg, data=replace(cfg.data, seed=7)))
    assert all(a.hash != b.hash for a, b in zip(data, keys, strict=True))
    assert keys.train.inputs["lora.r"] == 8 and "model files" in keys.train.inputs


def test_a_tokenizer_replaced_in_place_is_noticed(cfg):
    before = tokenizer_fingerprint(cfg)
    (Path(cfg.model.name_or_path) / "tokenizer.json").write_text("[]")
    assert tokenizer_fingerprint(cfg) != before


def test_a_stage_is_current_only_after_it_is_done_and_while_its_outputs_are_whole(cfg):
    rundir, keys = RunDir(cfg), stage_keys(cfg)
    stage = Stage(rundir, keys.prepare)
    assert not stage.up_to_date()
    _prepare(rundir, keys.prepare)
    assert stage.up_to_date() and not stage.up_to_date(force=True)
    (rundir.root / "data/stats.json").write_text("changed")
    problem = StageRecords(rundir).problem("prepare", keys.prepare.hash)
    assert problem == "output data/stats.json was changed or damaged after the stage wrote it"


def test_a_failed_attempt_is_recorded_and_never_current(cfg):
    rundir, keys = RunDir(cfg), stage_keys(cfg)
    _prepare(rundir, keys.prepare)
    stage = Stage(rundir, keys.prepare)
    with pytest.raises(RuntimeError), stage.attempt():
        raise RuntimeError("disk full")
    record = StageRecords(rundir).stage_record("prepare")
    assert record["status"] == "failed" and record["error"] == "disk full" and not stage.up_to_date()


def test_a_stage_refuses_a_missing_or_foreign_upstream_and_names_the_command(cfg):
    rundir, keys = RunDir(cfg), stage_keys(cfg)
    train = Stage(rundir, keys.train, upstream=keys.prepare)
    with pytest.raises(LoralabError, match=r"train needs the outputs of 'prepare'.*`loralab prepare CONFIG`"):
        train.require_upstream()
    other = stage_keys(replace(cfg, data=replace(cfg.data, seed=7)))
    _prepare(rundir, other.prepare)
    with pytest.raises(LoralabError, match=r"made from a different config \(data.seed: 7 in the run, 42 now\)"):
        train.require_upstream()
    _prepare(rundir, keys.prepare)
    train.require_upstream()  # the prepare on disk is this config's
