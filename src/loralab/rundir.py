"""The run directory ``<output_dir>/<name>/``: its layout, atomic writes, the manifest and stage hashes.

Each stage records a hash of everything it depends on (its config sections, the data file, and the
hash of the stage before it). A stage whose hash is unchanged and whose outputs exist is skipped; a
stage that reads an earlier stage's outputs refuses them when they were made from another config.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any, Iterable, Mapping

from loralab.config import ExperimentConfig, dump_config
from loralab.errors import LoralabError

STAGES = ("prepare", "train", "eval", "report")

# Config sections (and top-level keys) each stage's outputs depend on, besides the stage before it.
STAGE_INPUTS = {
    "prepare": ("model.name_or_path", "model.revision", "data"),
    "train": ("model", "lora", "train"),
    "eval": ("eval",),
    "report": (),
}


_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via a temp file in the same folder and rename, so a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give them the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


class JsonlError(ValueError):
    """A JSON-lines line that is not JSON: ``line`` is its number (from 1), ``why`` the parser's reason."""

    def __init__(self, line: int, why: str):
        super().__init__(f"line {line}: not valid JSON ({why})")
        self.line, self.why = line, why


def parse_jsonl(lines: Iterable[str]) -> list:
    """The values of JSON-lines text (blank lines skipped); the first bad line raises JsonlError."""
    rows = []
    for n, line in enumerate(lines, 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise JsonlError(n, err.msg) from None
    return rows


def read_jsonl(path: Path) -> list[dict]:
    """The rows of a JSON-lines file the run directory holds; a damaged one is a LoralabError naming the line."""
    try:
        with open(path, encoding="utf-8") as f:
            rows = parse_jsonl(f)
    except (JsonlError, UnicodeDecodeError, RecursionError) as err:
        where, why = (f" line {err.line}", "not valid JSON") if isinstance(err, JsonlError) else ("", type(err).__name__)
        raise LoralabError(f"{path}{where} is damaged ({why}); run the stage that writes it again "
                           f"with --force (or delete the run directory)") from None
    except OSError as err:
        raise LoralabError(f"cannot read {path} ({err.strerror or err}); check the file's permissions") from None
    return rows


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _lookup(cfg: dict, dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        node = node[part]
    return node


def stage_hash(cfg: ExperimentConfig, stage: str, upstream_hash: str | None, extra: dict | None = None) -> str:
    """Hash of what ``stage``'s outputs depend on."""
    as_dict = cfg.to_dict()
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
    flat = flatten(cfg.to_dict())
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


def folder_hashes(root: Path, rels: Iterable[str]) -> dict[str, str]:
    """sha256 of each named file under ``root``: what a stage records so a changed or truncated output is noticed."""
    return {rel: file_sha256(root / rel) for rel in rels}


# The run directory's file names (RunDir's paths, the report and compare read them by these names).
CONFIG_FILE = "config.yaml"
MANIFEST_FILE = "manifest.json"
STATS_FILE = "data/stats.json"
METRICS_FILE = "metrics.jsonl"
EVAL_RESULTS_FILE = "eval_results.csv"
PREDICTIONS_FILE = "predictions.jsonl"
EXAMPLES_FILE = "examples.md"
LOSS_CURVE_FILE = "loss_curve.png"
FLOW_FILE = "lora_flow.png"
REPORT_FILE = "report.md"
HTML_REPORT_FILE = "report.html"


class RunDir:
    """Owns the layout of one experiment's run directory."""

    def __init__(self, cfg: ExperimentConfig):
        self.cfg = cfg
        self.root = cfg.run_dir

    # Layout -------------------------------------------------------------------------------------
    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def train_file(self) -> Path:
        return self.data_dir / "train.jsonl"

    @property
    def eval_file(self) -> Path:
        return self.data_dir / "eval.jsonl"

    @property
    def stats_file(self) -> Path:
        return self.root / STATS_FILE

    @property
    def adapter_dir(self) -> Path:
        return self.root / "adapter"

    @property
    def checkpoints_dir(self) -> Path:
        return self.root / "checkpoints"

    @property
    def metrics_file(self) -> Path:
        return self.root / METRICS_FILE

    @property
    def manifest_file(self) -> Path:
        return self.root / MANIFEST_FILE

    @property
    def eval_results_file(self) -> Path:
        return self.root / EVAL_RESULTS_FILE

    @property
    def predictions_file(self) -> Path:
        return self.root / PREDICTIONS_FILE

    @property
    def examples_file(self) -> Path:
        return self.root / EXAMPLES_FILE

    @property
    def report_file(self) -> Path:
        return self.root / "report.md"

    @property
    def cache_dir(self) -> Path:
        """Shared by every experiment under the same output_dir (base-model generations)."""
        return Path(self.cfg.output_dir) / ".cache"

    STAGE_OUTPUTS = {
        "prepare": ("data/train.jsonl", "data/eval.jsonl", "data/stats.json"),
        "train": ("adapter/adapter_model.safetensors", "adapter/adapter_config.json", METRICS_FILE),
        "eval": (EVAL_RESULTS_FILE, PREDICTIONS_FILE, EXAMPLES_FILE),
        "report": (REPORT_FILE, LOSS_CURVE_FILE, FLOW_FILE),
    }

    # Manifest ------------------------------------------------------------------------------------
    def manifest(self) -> dict:
        if not self.manifest_file.exists():
            return {}
        try:
            manifest = json.loads(self.manifest_file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
            raise LoralabError(f"cannot read {self.manifest_file} ({type(err).__name__}); it is damaged: "
                               f"delete the run directory {self.root} to start this run afresh") from None
        if not isinstance(manifest, dict) or not isinstance(manifest.get("stages", {}), dict):
            raise LoralabError(f"{self.manifest_file} is damaged (not a loralab manifest); "
                               f"delete the run directory {self.root} to start this run afresh")
        return manifest

    def update_manifest(self, **fields: Any) -> dict:
        manifest = self.manifest()
        for key, value in fields.items():
            if isinstance(value, dict) and isinstance(manifest.get(key), dict):
                manifest[key].update(value)
            else:
                manifest[key] = value
        self.root.mkdir(parents=True, exist_ok=True)
        write_json(self.manifest_file, manifest)
        return manifest

    def write_config(self) -> None:
        atomic_write_text(self.root / CONFIG_FILE, dump_config(self.cfg))

    # Stages --------------------------------------------------------------------------------------
    def stage_record(self, stage: str) -> dict:
        record = self.manifest().get("stages", {}).get(stage, {})
        return record if isinstance(record, dict) else {}

    def recorded_hash(self, stage: str) -> str | None:
        return self.stage_record(stage).get("hash")

    def outputs_exist(self, stage: str) -> bool:
        return all((self.root / rel).exists() for rel in self.STAGE_OUTPUTS[stage])

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
                    "interrupted": "was interrupted (Ctrl-C)"}.get(status, f"failed{error}")
        for rel, digest in (record.get("outputs") or {}).items():
            path = self.root / rel
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
                f"{for_stage} needs the outputs of '{stage}' in {self.root}; run `loralab {stage} CONFIG` (or `loralab run CONFIG`) first"
            )
        if problem is not None:
            raise LoralabError(
                f"the '{stage}' outputs in {self.root} cannot be used: the last {stage} {problem}; "
                f"run `loralab {stage} CONFIG` again (or `loralab run CONFIG`) before {for_stage}"
            )

    def _set_stage(self, stage: str, record: dict) -> None:
        stages = self.manifest().get("stages", {})
        stages[stage] = record
        self.update_manifest(stages=stages)

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
                self._set_stage(stage, {**record, "status": "failed", "ended_at": _now(), "error": str(err)[:300]})
            raise

    def mark_done(self, stage: str, stage_hash_: str, wall_s: float, inputs: dict | None = None,
                  write_config: bool = True, **extra: Any) -> None:
        """Record ``stage`` as finished: its hash, the inputs it was made from and its outputs' sha256.
        ``write_config``: the stage consumed the config, so config.yaml becomes the one its outputs were made from."""
        # Later stages need no invalidation here: their expected hash chains this one's, so it changes too.
        if write_config:
            self.write_config()
        outputs = [rel for rel in self.STAGE_OUTPUTS[stage] if stage != "report"]
        before = STAGES[STAGES.index(stage) - 1] if stage != STAGES[0] else None
        self._set_stage(stage, {
            "hash": stage_hash_,
            "status": "done",
            "upstream": outputs_digest(self.stage_record(before)) if before else None,
            "wall_s": round(wall_s, 3),
            "finished_at": _now(),
            "inputs": inputs or {},
            "outputs": folder_hashes(self.root, outputs),
            **extra,
        })


def outputs_digest(record: dict) -> str | None:
    """Names one attempt of a stage by what it wrote: the digest of its outputs' sha256."""
    outputs = record.get("outputs")
    return hashlib.sha256(json.dumps(outputs, sort_keys=True).encode()).hexdigest()[:16] if outputs else None


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# Lock ------------------------------------------------------------------------------------------------
LOCK_FILE = ".lock"

try:
    import fcntl
except ImportError:  # Windows: the lock file's PID alone says whether it is held
    fcntl = None


class RunDirBusy(LoralabError):
    """Another loralab process holds the run directory."""



# Where accelerate reads a process's rank and the number of processes (accelerate.utils.environment,
# get_cpu_distributed_information): torchrun's names first, then MPI's (accelerate's multi-CPU launcher is mpirun).
# Listed here rather than imported: importing accelerate.utils costs every loralab command about 1.5 s.
RANK_VARIABLES = ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK")
SIZE_VARIABLES = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def _first_int(env: Mapping[str, str], names: Iterable[str], default: int) -> int:
    return next((int(env[name]) for name in names if int(env.get(name, -1)) >= 0), default)


def launched_processes(env: Mapping[str, str] = os.environ) -> tuple[int, int]:
    """(this process's rank, the number of processes) as torchrun and accelerate launch set them; (0, 1) alone."""
    return _first_int(env, RANK_VARIABLES, 0), _first_int(env, SIZE_VARIABLES, 1)


def accelerate_cpu_started_one(env: Mapping[str, str] = os.environ) -> bool:
    """True in the one process `accelerate launch --cpu --num_processes N` (N > 1, no mpirun) starts: accelerate sets
    MASTER_ADDR for the N processes but starts only this one (its --multi_gpu launcher starts N, on CPUs too)."""
    return (env.get("ACCELERATE_USE_CPU", "").lower() == "true" and "MASTER_ADDR" in env
            and not any(name in env for name in RANK_VARIABLES))


@contextlib.contextmanager
def run_lock(root: Path, command: str):
    """Hold ``<root>/.lock`` (the holder's PID, host and command) while a stage writes the run directory.

    The kernel's flock says whether the holder is alive: a lock left by a killed process is taken over
    (and said so). A second process gets RunDirBusy naming the holder. On release the file is removed, and
    so is the run directory when this process created it and left it empty. Interrupted writes of an
    earlier holder (the adapter swap, temp folders) are finished or removed once the lock is held.
    """
    root = Path(root)
    created = [d for d in (root, *root.parents) if not d.exists()]  # innermost first: removed in this order
    try:
        root.mkdir(parents=True, exist_ok=True)
        fd = _acquire(root / LOCK_FILE, command)
    except OSError as err:
        raise LoralabError(f"cannot write to {root} ({err.strerror or err}); choose a writable output_dir "
                           f"or fix the folder's permissions") from None
    try:
        recover_interrupted_writes(root)
        yield
    finally:
        (root / LOCK_FILE).unlink(missing_ok=True)  # while still held, so no one locks a file about to vanish
        os.close(fd)
        for folder in created:
            with contextlib.suppress(OSError):
                folder.rmdir()  # only when empty: a failed first stage leaves no output_dir behind


def _acquire(path: Path, command: str) -> int:
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            holder = _read_holder(fd)
            if not _try_lock(fd, holder):
                raise RunDirBusy(f"{path.parent} is in use by `loralab {holder.get('command', '?')}` (PID "
                                 f"{holder.get('pid', '?')} on {holder.get('host', '?')}, "
                                 f"since {holder.get('since', '?')}); "
                                 f"wait for it to finish, or give this run another name")
            try:
                same_file = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same_file = False
            if not same_file:  # the holder released (and removed) it between our open and our lock: try again
                os.close(fd)
                continue
            if holder.get("pid"):
                print(f"note: {path.parent} was locked by PID {holder['pid']} on {holder.get('host')}, which is "
                      f"no longer running (killed?); taking over")
            os.ftruncate(fd, 0)
            me = {"pid": os.getpid(), "host": socket.gethostname(), "command": command, "since": _now()}
            os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
            return fd
        except BaseException:
            os.close(fd)
            raise


def _read_holder(fd: int) -> dict:
    try:
        holder = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (ValueError, OSError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _try_lock(fd: int, holder: dict) -> bool:
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True  # the kernel (NFS too, since Linux 2.6.12) releases a dead holder's flock
    pid = holder.get("pid")
    return not (pid and holder.get("host") == socket.gethostname() and _pid_alive(pid))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


# Crash-safe folders ----------------------------------------------------------------------------------
COMPLETE_FILE = "loralab_complete.json"  # written last into a checkpoint or adapter folder: it is whole
NEW_ADAPTER = ".adapter-new"
OLD_ADAPTER = ".adapter-old"


def mark_complete(folder: Path, **info: Any) -> None:
    """Record that ``folder`` is whole: the sha256 of each file in it, written last and atomically."""
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                   if p.is_file() and p.name != COMPLETE_FILE)
    write_json(folder / COMPLETE_FILE, {**info, "files": folder_hashes(folder, files)})


def completeness(folder: Path) -> tuple[dict | None, str | None]:
    """(the completion record, None) for a whole folder, else (None, why it is not)."""
    marker = folder / COMPLETE_FILE
    if not marker.is_file():
        return None, "incomplete (its save was interrupted)"
    try:
        record = json.loads(marker.read_text(encoding="utf-8"))
        files = record["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return None, f"damaged ({COMPLETE_FILE} unreadable)"
    for rel, digest in files.items():
        path = folder / rel
        try:
            if not path.is_file() or file_sha256(path) != digest:
                return None, f"damaged ({rel} changed or truncated)"
        except OSError:
            return None, f"damaged ({rel} unreadable)"
    return record, None


def swap_in_adapter(saved: Path, adapter_dir: Path) -> None:
    """Move a complete ``.adapter-new`` into place. Every instant is recoverable (recover_interrupted_writes):
    before the first rename the old adapter stands; between the renames the complete new one is beside it."""
    old = adapter_dir.with_name(OLD_ADAPTER)
    shutil.rmtree(old, ignore_errors=True)
    if adapter_dir.exists():
        adapter_dir.rename(old)
    saved.rename(adapter_dir)
    shutil.rmtree(old, ignore_errors=True)


def recover_interrupted_writes(root: Path) -> None:
    """Finish or undo what a killed process left: a complete new adapter is swapped in, an incomplete one and
    stale temp files are removed, an old adapter left alone in the middle of a swap is put back."""
    new, old, adapter = root / NEW_ADAPTER, root / OLD_ADAPTER, root / "adapter"
    if new.is_dir():
        record, _ = completeness(new)
        if record is not None:
            swap_in_adapter(new, adapter)
            print(f"note: finished an adapter save that was interrupted ({adapter})")
        else:
            shutil.rmtree(new, ignore_errors=True)
    if old.is_dir():
        if adapter.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.rename(adapter)
    stale = [p for p in root.glob(".adapter-*") if p.name not in (NEW_ADAPTER, OLD_ADAPTER)]
    stale += [p for folder in (root, root / "data") for p in folder.glob(".*.tmp")]  # atomic_write leftovers
    for path in stale:
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


def environment_info() -> dict[str, Any]:
    """Versions and source state to reproduce a run: loralab, key packages, Python, git commit."""
    import platform
    import subprocess
    from importlib import metadata

    import loralab

    packages = {}
    for name in ("torch", "transformers", "peft", "accelerate", "datasets", "tokenizers", "sacrebleu", "rouge-score"):
        try:
            packages[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            packages[name] = None
    try:
        import torch

        packages["torch"] = torch.__version__  # includes the build (+cpu, +cu121)
    except ImportError:
        pass
    try:
        proc = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(loralab.__file__).parent, capture_output=True, text=True, timeout=5
        )
        commit = proc.stdout.strip() if proc.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"loralab_version": loralab.__version__, "python": platform.python_version(), "packages": packages, "git_commit": commit}


def check_output_dir(dest: Path, overwrite: bool, what: str) -> None:
    """Refuse to write ``what`` into ``dest`` when it holds something, unless ``overwrite``."""
    if dest.exists() and not dest.is_dir():
        raise LoralabError(f"{dest} is a file; give --out a folder for the {what}")
    if dest.is_dir() and any(dest.iterdir()) and not overwrite:
        raise LoralabError(f"{dest} already holds files; pass --overwrite to replace them, or choose another --out")


def check_free_space(folder: Path, need_bytes: int, what: str) -> None:
    """Fail before writing when the disk under ``folder`` has less than ``need_bytes`` free."""
    import shutil

    probe = folder
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < need_bytes:
        raise LoralabError(
            f"the {what} needs about {need_bytes / 1e9:.2f} GB but only {free / 1e9:.2f} GB is free under {probe}; "
            "free some space or choose another --out"
        )


def replace_dir(dest: Path, fill) -> None:
    """Build a folder with ``fill(tmp)`` beside ``dest``, then swap it in; a failure leaves ``dest`` as it was."""
    import shutil

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp"))
    old = dest.parent / f".{dest.name}.old"
    try:
        fill(tmp)
        os.chmod(tmp, 0o777 & ~_UMASK)
        if dest.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(dest, old)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not dest.exists():
            os.replace(old, dest)
        raise
    shutil.rmtree(old, ignore_errors=True)
