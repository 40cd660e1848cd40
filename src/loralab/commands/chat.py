"""`loralab generate` and `loralab chat`: answers from a base model, a run's adapter or a merged folder.

Prompts are built as training built them (`loralab.data.conversation_prompt_ids`: the chat template, then
the BOS rule), so the model sees at inference the token ids it was trained on. Greedy by default, which
gives the same answers as `loralab eval`; ``--temperature`` above 0 samples. ``--compare`` answers with the
base model and with the LoRA: one model in memory, the adapter switched off for the base answer.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import torch

from loralab import devices
from loralab.data import conversation_prompt_ids, make_template
from loralab.errors import LoralabError, hide_library_deprecations
from loralab.generation import greedy_generation_config
from loralab.models.adapters import attach_adapter, checked_adapter, resolve_target
from loralab.models.loading import DTYPES, load_model, load_tokenizer
from loralab.precision import choose_precision


@dataclass
class SamplingSettings:
    max_new_tokens: int = 256
    """Longest answer in tokens."""
    temperature: float = 0.0
    """0: greedy (deterministic, as in eval); above 0: sampling at this temperature."""
    top_p: float = 1.0
    """Nucleus sampling: sample from the smallest set of tokens holding this much probability."""
    seed: int = 0
    """Seed of the sampler (each answer starts from it)."""
    compare: bool = False
    """Answer with the base model and with the LoRA, one after the other."""
    base_only: bool = False
    """Answer with the base model only."""


def settings_from_args(args) -> SamplingSettings:
    settings = SamplingSettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                                seed=args.seed, compare=args.compare, base_only=args.base)
    if settings.max_new_tokens < 1:
        raise LoralabError(f"--max-new-tokens must be at least 1, got {settings.max_new_tokens}")
    if settings.temperature < 0:
        raise LoralabError(f"--temperature must be 0 (greedy) or more, got {settings.temperature}")
    if not 0 < settings.top_p <= 1:
        raise LoralabError(f"--top-p must be in (0, 1], got {settings.top_p}")
    if settings.compare and settings.base_only:
        raise LoralabError("--compare already answers with the base model; drop --base")
    return settings


@dataclass
class Responder:
    """A loaded model that answers conversations."""

    model: object
    tokenizer: object
    template: object
    lora: bool
    """The answers include the run's adapter (merged, or switchable when comparing)."""
    settings: SamplingSettings

    def sides(self) -> list[str]:
        if self.settings.compare:
            return ["base", "lora"]
        return ["lora"] if self.lora else ["base"]

    def answer(self, messages: list[dict[str, str]], side: str, out: TextIO | None = None) -> str:
        """The answer to ``messages`` from ``side`` ("base" or "lora"), streamed to ``out`` as it comes."""
        ids = conversation_prompt_ids(self.tokenizer, self.template, messages)
        off = self.model.disable_adapter() if side == "base" and self.settings.compare else contextlib.nullcontext()
        streamer = _Streamer(self.tokenizer, out) if out is not None else None
        torch.manual_seed(self.settings.seed)
        with off, torch.inference_mode():
            output = self.model.generate(
                input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                generation_config=generation_config(self.settings, self.tokenizer), streamer=streamer,
            )
        new = output[0, len(ids):].tolist()
        eos = self.tokenizer.eos_token_id
        new = new[: new.index(eos)] if eos in new else new
        return self.tokenizer.decode(new, skip_special_tokens=True).strip()


class _Streamer:
    """Prints decoded text as tokens arrive (transformers' streamer protocol: put, end)."""

    def __init__(self, tokenizer, out: TextIO):
        from transformers import TextStreamer

        self._inner = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self._inner.on_finalized_text = self._write
        self._out = out

    def _write(self, text: str, stream_end: bool = False) -> None:
        self._out.write(text if not stream_end else text.rstrip() + "\n")
        self._out.flush()

    def put(self, value) -> None:
        self._inner.put(value)

    def end(self) -> None:
        self._inner.end()


def generation_config(settings: SamplingSettings, tokenizer):
    from transformers import GenerationConfig

    if settings.temperature == 0:
        return greedy_generation_config(settings.max_new_tokens, [tokenizer.eos_token_id], tokenizer.pad_token_id)
    return GenerationConfig(do_sample=True, temperature=settings.temperature, top_p=settings.top_p, top_k=0,
                            max_new_tokens=settings.max_new_tokens, eos_token_id=[tokenizer.eos_token_id],
                            pad_token_id=tokenizer.pad_token_id, repetition_penalty=1.0, min_new_tokens=0)


def load_responder(target: str, settings: SamplingSettings, overrides: list[str] | None = None) -> Responder:
    """The model behind ``target`` in the precision eval uses, with the run's adapter unless ``base_only``."""
    tgt = resolve_target(target, overrides)
    use_adapter = tgt.cfg is not None and not settings.base_only
    if settings.compare and tgt.cfg is None:
        raise LoralabError(f"--compare needs a run with a trained adapter; {tgt.label} is a model folder")
    adapter = checked_adapter(tgt, "generate/chat") if use_adapter else None
    device = devices.detect_device(tgt.cfg.train.device if tgt.cfg is not None else "auto")
    precision = choose_precision(devices.probe(device), tgt.cfg.train.precision if tgt.cfg is not None else "auto")
    tokenizer = load_tokenizer(tgt.model)
    model = load_model(tgt.model, "fp32" if adapter is not None else precision, device)
    if adapter is not None:
        model = attach_adapter(model, adapter)
        if not settings.compare:
            model = model.merge_and_unload()  # as eval does: no LoRA matmuls per token
        model = model.to(DTYPES[precision])  # merged in fp32, then the compute precision, as merge does
    model.eval()
    template = make_template(tokenizer, tgt.cfg.data.template if tgt.cfg is not None else "auto")
    return Responder(model, tokenizer, template, lora=adapter is not None, settings=settings)


def read_prompts(prompts: list[str], file: str | None) -> list[str]:
    found = list(prompts)
    if file is not None:
        try:
            found += [line.strip() for line in Path(file).read_text(encoding="utf-8").splitlines() if line.strip()]
        except OSError as err:
            raise LoralabError(
                f"cannot read prompts from {file} ({err.strerror}); give a text file with one prompt per line"
            ) from None
    if not found:
        raise LoralabError("no prompts: give them on the command line or with --file FILE (one per line)")
    return found


@hide_library_deprecations
def generate(target: str, prompts: list[str], file: str | None, settings: SamplingSettings,
             overrides: list[str] | None = None, out: TextIO | None = None) -> list[dict[str, str]]:
    """Answer each prompt (one user turn each); print as they stream; return [{"prompt", side: answer}]."""
    out = out or sys.stdout
    questions = read_prompts(prompts, file)
    responder = load_responder(target, settings, overrides)
    results = []
    for question in questions:
        out.write(f">>> {question}\n")
        row = {"prompt": question}
        for side in responder.sides():
            if settings.compare:
                out.write(f"[{side}] ")
            row[side] = responder.answer([{"role": "user", "content": question}], side, out)
        out.write("\n")
        results.append(row)
    return results


QUIT_COMMANDS = ("/exit", "/quit", "/bye")  # /quit and /bye as other chat tools spell it
COMMANDS_HELP = "/reset starts a new conversation, /exit quits"


def is_command(text: str) -> bool:
    """Whether a chat line is a slash command (one word: "/help", "/q", or "/?"), not a message that starts with a
    slash."""
    return text.startswith("/") and (text[1:].isalpha() or text == "/?")


@hide_library_deprecations
def chat(target: str, settings: SamplingSettings, overrides: list[str] | None = None,
         stdin: TextIO | None = None, out: TextIO | None = None) -> None:
    """Multi-turn chat on ``stdin``: /reset starts over, /exit (or /quit, /bye, or end of input) quits; another
    slash command gets a line saying which there are."""
    stdin, out = stdin or sys.stdin, out or sys.stdout
    responder = load_responder(target, settings, overrides)
    sides = responder.sides()
    histories: dict[str, list[dict[str, str]]] = {side: [] for side in sides}
    interactive = stdin.isatty()
    if interactive:
        out.write(f"loralab chat: {COMMANDS_HELP}.\n")
    while True:
        if interactive:
            out.write("you> ")
            out.flush()
        line = stdin.readline()
        text = line.strip()
        if not line or text in QUIT_COMMANDS:
            break
        if not text:
            continue
        if text == "/reset":
            histories = {side: [] for side in sides}
            out.write("(new conversation)\n")
            continue
        if is_command(text):  # a mistyped command is not sent to the model as a message
            out.write(f"(unknown command {text}: {COMMANDS_HELP})\n")
            continue
        for side in sides:
            out.write(f"{side}> ")
            history = histories[side] + [{"role": "user", "content": text}]
            reply = responder.answer(history, side, out)
            histories[side] = history + [{"role": "assistant", "content": reply}]
