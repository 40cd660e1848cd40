"""The one protocol every stage follows in the run directory: require the stage before, skip when current,
attempt, mark done.

Each stage records a hash of everything it depends on (its config sections, content fingerprints, and the
hash of the stage before it). A stage whose hash is unchanged and whose outputs are whole is skipped; a
stage that reads an earlier stage's outputs refuses them when they were made from another config.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
from typing import Any, NamedTuple

from loralab.config import ExperimentConfig
from loralab.errors import LoralabError, first_sentence
from loralab.files import atomic_write_bytes, file_sha256, folder_hashes
from loralab.launch import launched_processes
from loralab.runs.layout import UNVERIFIED, RunDir, outputs_digest

STAGES = ("prepare", "train", "eval", "report")
# A stage recorded unverified (RunDir.rebuild_manifest), and what to do about it.
UNVERIFIED_PROBLEM = "could not be verified after a damaged manifest.json was rebuilt from the run's files"
REBUILT_ADVICE = ("run `loralab run CONFIG`: it redoes what cannot be verified and keeps an adapter made from "
                  "this config")

# Config sections (and top-level keys) each stage's outputs depend on, besides the stage before it.
STAGE_INPUTS = {
    "prepare": ("model.name_or_path", "model.revision", "data"),
    "train": ("model", "lora", "train"),
    "eval": ("eval",),
    "report": (),
}

# Settings that choose how many runs to make, not what one run computes: left out of every stage's hash (runs
# made before they existed keep their hashes).
UNHASHED = ("train.seeds",)


def _hashed(as_dict: dict) -> dict:
    """The config mapping without the UNHASHED keys."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in as_dict.items()}
    for dotted in UNHASHED:
        section, key = dotted.split(".")
        out.get(section, {}).pop(key, None)
    return out


def _lookup(cfg: dict, dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        node = node[part]
    return node


def stage_hash(cfg: ExperimentConfig, stage: str, upstream_hash: str | None, extra: dict | None = None) -> str:
    """Hash of what ``stage``'s outputs depend on."""
    as_dict = _hashed(cfg.to_dict())
    payload = {
        "stage": stage,
        "inputs": {key: _lookup(as_dict, key) for key in STAGE_INPUTS[stage]},
        "upstream": upstream_hash,
        "extra": extra or {},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """``{"lora": {"r": 8}}`` -> ``{"lora.r": 8}`` (lists stay values)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def stage_inputs(cfg: ExperimentConfig, stage: str, fingerprints: dict[str, str] | None = None) -> dict[str, Any]:
    """Every setting ``stage``'s outputs depend on, its upstream stages' included, as dotted keys, plus the
    content fingerprints (data file, model files) the caller passes: what a refusal names when they differ."""
    flat = flatten(_hashed(cfg.to_dict()))
    prefixes = [key for s in STAGES[: STAGES.index(stage) + 1] for key in STAGE_INPUTS[s]]
    chosen = {k: v for k, v in flat.items() if any(k == p or k.startswith(p + ".") for p in prefixes)}
    return {**chosen, **(fingerprints or {})}


def differences(recorded: dict[str, Any], current: dict[str, Any], limit: int = 3) -> str:
    """``"lora.r: 8 in the run, 4 now"`` for the first ``limit`` keys whose values differ."""
    keys = [k for k in sorted(set(recorded) | set(current)) if recorded.get(k) != current.get(k)]
    shown = [f"{k}: {_short(recorded.get(k))} in the run, {_short(current.get(k))} now" for k in keys[:limit]]
    return "; ".join(shown) + (f" (and {len(keys) - limit} more)" if len(keys) > limit else "")


def _short(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 40 else text[:18] + "..." + text[-18:]



def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


class StageRecords:
    """The manifest's record of each stage of one run directory: what a stage finished with, and why its outputs
    cannot be used (missing, unfinished, changed on disk, made from another config or another upstream attempt)."""

    def __init__(self, rundir: RunDir):
        self.rundir = rundir

    def stage_record(self, stage: str) -> dict:
        record = self.rundir.manifest().get("stages", {}).get(stage, {})
        return record if isinstance(record, dict) else {}

    def recorded_hash(self, stage: str) -> str | None:
        return self.stage_record(stage).get("hash")

    def outputs_exist(self, stage: str) -> bool:
        return all((self.rundir.root / rel).exists() for rel in self.rundir.STAGE_OUTPUTS[stage])

    def finished_whole(self, stage: str) -> bool:
        """The stage's last attempt finished and its outputs are as it wrote them, whatever config made them: a run
        to keep until another attempt of the stage has finished."""
        record = self.stage_record(stage)
        return bool(record) and self.outputs_exist(stage) and self._record_problem(record) is None

    def problem(self, stage: str, expected_hash: str, current_inputs: dict | None = None) -> str | None:
        """Why ``stage``'s outputs cannot be used with this config, or None when they can. In order: missing,
        from an attempt that did not finish, changed on disk since, made from other settings or inputs, built
        on other outputs of the stage before it than those on disk."""
        if not self.outputs_exist(stage):
            return "missing"
        record = self.stage_record(stage)
        problem = self._record_problem(record)
        if problem is None and record.get("hash") != expected_hash:
            diff = differences(record.get("inputs") or {}, current_inputs or {}) if current_inputs is not None else ""
            why = f" ({diff})" if diff else " or an earlier attempt of the stage before it"
            problem = "was made from a different config" + why
        return problem or self._upstream_problem(stage, record)

    def _upstream_problem(self, stage: str, record: dict) -> str | None:
        """Outputs made from another attempt of the stage before (same config, other outputs: a retrain)."""
        before = STAGES[STAGES.index(stage) - 1] if stage != STAGES[0] else None
        if before is None or record.get("upstream") is None:
            return None
        upstream = self.stage_record(before)
        if record["upstream"] != outputs_digest(upstream):
            return f"was made from an earlier attempt of '{before}', not the one on disk"
        problem = self._record_problem(upstream) or self._upstream_problem(before, upstream)
        return f"was made from the '{before}' outputs, and that stage {problem}" if problem else None

    def _record_problem(self, record: dict) -> str | None:
        """An attempt that did not finish, or outputs changed on disk after it finished."""
        status = record.get("status", "done")  # manifests before outcomes were recorded: done when listed
        if status != "done":
            error = f": {record['error']}" if record.get("error") else ""
            return {"running": "was stopped before it finished (the process was killed)",
                    "interrupted": "was interrupted (Ctrl-C)",
                    UNVERIFIED: UNVERIFIED_PROBLEM}.get(status, f"failed{error}")
        for rel, digest in (record.get("outputs") or {}).items():
            path = self.rundir.root / rel
            try:
                same = path.is_file() and file_sha256(path) == digest
            except OSError:
                same = False
            if not same:
                return f"output {rel} was changed or damaged after the stage wrote it"
        return None

    def report_problem(self, cfg: ExperimentConfig) -> str | None:
        """Why a report of this run directory for ``cfg`` would mix runs, or None. Each stage that ran must have
        finished, its outputs be whole, be built on the attempt of the stage before it that is on disk, and be
        made with ``cfg``'s settings. Eval may not have run yet (the report says so)."""
        for stage in ("prepare", "train", "eval"):
            record = self.stage_record(stage)
            if not record:
                return None if stage == "eval" else f"the '{stage}' stage has not run"
            recorded = {k: v for k, v in (record.get("inputs") or {}).items() if k in flatten(cfg.to_dict())}
            wanted = {k: v for k, v in stage_inputs(cfg, stage).items() if k in recorded}
            problem = self._record_problem(record)  # its outputs' hashes included
            problem = problem or self._upstream_problem(stage, record)
            if problem is None and recorded != wanted:
                problem = f"was made from a different config ({differences(recorded, wanted)})"
            if problem is not None:
                return f"its '{stage}' stage {problem}"
        return None

    def is_current(self, stage: str, expected_hash: str) -> bool:
        return self.problem(stage, expected_hash) is None

    def require_current(self, stage: str, expected_hash: str, for_stage: str,
                        current_inputs: dict | None = None) -> None:
        """Refuse to build on ``stage``'s outputs unless they are whole and were made from this config."""
        problem = self.problem(stage, expected_hash, current_inputs)
        if problem == "missing":
            raise LoralabError(
                f"{for_stage} needs the outputs of '{stage}' in {self.rundir.root}; "
                f"run `loralab {stage} CONFIG` (or `loralab run CONFIG`) first"
            )
        if problem is not None:
            redo = (REBUILT_ADVICE if UNVERIFIED_PROBLEM in problem
                    else f"run `loralab {stage} CONFIG` again (or `loralab run CONFIG`) before {for_stage}")
            raise LoralabError(f"the '{stage}' outputs in {self.rundir.root} cannot be used: "
                               f"the last {stage} {problem}; {redo}")

    def confirm_rebuilt(self, key: StageKey, upstream: StageKey | None) -> None:
        """After manifest.json was rebuilt from the run's files (RunDir.rebuild_manifest): a stage recorded unverified
        whose hash, read from its own files (train: its adapter's completion marker), is ``key``'s was made from this
        config, and so was the stage before it, whose hash that one chains: both are recorded done with this config's
        inputs. Anything else stays unverified, to be redone."""
        stages = self.rundir.manifest().get("stages", {})
        record = stages.get(key.name)
        if not isinstance(record, dict) or record.get("status") != UNVERIFIED or record.get("hash") != key.hash:
            return
        stages[key.name] = {**record, "status": "done", "inputs": key.inputs}
        before = stages.get(upstream.name) if upstream is not None else None
        if isinstance(before, dict) and before.get("status") == UNVERIFIED:
            stages[upstream.name] = {**before, "status": "done", "hash": upstream.hash, "inputs": upstream.inputs}
        self.rundir.update_manifest(stages=stages)

    def _set_stage(self, stage: str, record: dict) -> None:
        stages = self.rundir.manifest().get("stages", {})
        stages[stage] = record
        self.rundir.update_manifest(stages=stages)

    @contextlib.contextmanager
    def attempt(self, stage: str, stage_hash_: str):
        """Around the part of a stage that writes its outputs: until mark_done the manifest says the stage is
        running, so a killed, failed or interrupted attempt is never taken for a finished one (nor is
        anything built on it); an exception records failed or interrupted, and is raised on."""
        self._set_stage(stage, {"hash": stage_hash_, "status": "running", "started_at": _now(), "pid": os.getpid()})
        try:
            yield
        except KeyboardInterrupt:
            self._set_stage(stage, {**self.stage_record(stage), "status": "interrupted", "ended_at": _now()})
            raise
        except BaseException as err:
            record = self.stage_record(stage)
            if record.get("status") != "done":  # an error after mark_done leaves the finished record alone
                self._set_stage(stage, {**record, "status": "failed", "ended_at": _now(),
                                        "error": first_sentence(err, 300)})
            raise

    def mark_done(self, stage: str, stage_hash_: str, wall_s: float, inputs: dict | None = None,
                  write_config: bool = True, **extra: Any) -> None:
        """Record ``stage`` as finished: its hash, the inputs it was made from and its outputs' sha256.
        ``write_config``: the stage consumed the config, so config.yaml becomes the one its outputs were made from."""
        # Later stages need no invalidation here: their expected hash chains this one's, so it changes too.
        if write_config:
            self.rundir.write_config()
        outputs = [rel for rel in self.rundir.STAGE_OUTPUTS[stage] if stage != "report"]
        before = STAGES[STAGES.index(stage) - 1] if stage != STAGES[0] else None
        self._set_stage(stage, {
            "hash": stage_hash_,
            "status": "done",
            "upstream": outputs_digest(self.stage_record(before)) if before else None,
            "wall_s": round(wall_s, 3),
            "finished_at": _now(),
            "inputs": inputs or {},
            "outputs": folder_hashes(self.rundir.root, outputs),
            **extra,
        })


class StageKey(NamedTuple):
    """What one stage's outputs are made from for a config: its hash, and the settings and fingerprints behind it
    (what a refusal names when they differ)."""

    name: str
    hash: str
    inputs: dict[str, Any]


class Stage:
    """One stage of one config's run, and the protocol every stage follows:

        stage = Stage(rundir, key, upstream)   # keys: loralab.runs.fingerprints.stage_keys
        stage.require_upstream()               # the stage before finished, whole, from this config
        if stage.up_to_date(force): return     # skipped when nothing it depends on changed
        with stage.attempt():                  # the manifest says "running" until done()
            ... write the outputs ...
            stage.done(wall_s, **facts)        # hash, inputs and the outputs' sha256 recorded
    """

    def __init__(self, rundir: RunDir, key: StageKey, upstream: StageKey | None = None):
        self.rundir, self.key, self.upstream = rundir, key, upstream
        self.records = StageRecords(rundir)

    @property
    def name(self) -> str:
        return self.key.name

    @property
    def hash(self) -> str:
        return self.key.hash

    def require_upstream(self) -> None:
        self._confirm_rebuilt()
        if self.upstream is not None:
            self.records.require_current(self.upstream.name, self.upstream.hash, self.name, self.upstream.inputs)

    def up_to_date(self, force: bool = False) -> bool:
        self._confirm_rebuilt()
        return not force and self.records.is_current(self.name, self.hash)

    def _confirm_rebuilt(self) -> None:
        if launched_processes()[0] == 0:  # only the main process writes the run directory
            self.records.confirm_rebuilt(self.key, self.upstream)

    def attempt(self):
        return self.records.attempt(self.name, self.hash)

    def done(self, wall_s: float, write_config: bool = True, **extra: Any) -> None:
        self.records.mark_done(self.name, self.hash, wall_s, inputs=self.key.inputs, write_config=write_config,
                               **extra)


def copy_stage(source: RunDir, dest: RunDir, stage: str) -> bool:
    """Give ``dest`` the finished ``stage`` of ``source`` (its output files and its manifest record) when the stage
    is done and whole there and not yet done in ``dest``: what a stage that would compute the same files again can
    share. Returns whether it copied."""
    record = StageRecords(source).stage_record(stage)
    if StageRecords(source).problem(stage, record.get("hash", "")) is not None:
        return False
    if StageRecords(dest).stage_record(stage).get("status") == "done":
        return False
    for rel in dest.STAGE_OUTPUTS[stage]:
        atomic_write_bytes(dest.root / rel, (source.root / rel).read_bytes())
    StageRecords(dest)._set_stage(stage, record)
    return True
