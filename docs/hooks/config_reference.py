"""MkDocs hook: the config reference, generated from the config dataclasses' field docstrings.

At build time this parses ``src/loralab/config.py`` with :mod:`ast` (it never imports loralab, so the docs build
without the package or its dependencies installed) and replaces the placeholder line
``<!-- config-reference -->`` in a page with one table per config section: key, type, default, description.

Which dataclass is which YAML section comes from the root dataclass (``ExperimentConfig``): a field whose
annotation names another dataclass of the module is a section (``model: ModelConfig`` -> ``model.*``); its
other fields are top-level keys (``name``, ``output_dir``). A field's description is the string literal
written right under it (an attribute docstring).

The build fails loudly rather than publishing a wrong page: a placeholder with no field found, a missing
config file or root class raise; a leaf field without a docstring is a warning, which ``mkdocs build --strict``
turns into a failure.
"""

from __future__ import annotations

import ast
import inspect
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

PLACEHOLDER = "<!-- config-reference -->"
CONFIG_FILE = "src/loralab/config.py"  # relative to the folder of mkdocs.yml
ROOT_CLASS = "ExperimentConfig"

log = logging.getLogger("mkdocs.hooks.config_reference")


class ConfigReferenceError(RuntimeError):
    """The config reference could not be generated; the docs build must stop."""


@dataclass
class Field:
    name: str
    type: str
    default: str | None  # None: required, no default
    doc: str
    annotation: ast.expr


def _is_dataclass(node: ast.ClassDef) -> bool:
    for deco in node.decorator_list:
        target = deco.func if isinstance(deco, ast.Call) else deco
        if isinstance(target, ast.Name) and target.id == "dataclass":
            return True
        if isinstance(target, ast.Attribute) and target.attr == "dataclass":
            return True
    return False


def _constants(tree: ast.Module) -> dict[str, ast.expr]:
    """Module-level ``NAME = <literal>`` assignments, so a default like ``list(DEFAULT_PROMPTS)`` can show its value."""
    found = {}
    for stmt in tree.body:
        if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name):
            try:
                ast.literal_eval(stmt.value)
            except ValueError:
                continue
            found[stmt.targets[0].id] = stmt.value
    return found


class _Inline(ast.NodeTransformer):
    """Replace module constants by their literal value and ``list(<list literal>)`` by the literal."""

    def __init__(self, constants: dict[str, ast.expr]):
        self.constants = constants

    def visit_Name(self, node: ast.Name) -> ast.expr:
        return self.constants.get(node.id, node)

    def visit_Call(self, node: ast.Call) -> ast.expr:
        self.generic_visit(node)
        if (isinstance(node.func, ast.Name) and node.func.id in ("list", "dict", "tuple") and len(node.args) == 1
                and not node.keywords and isinstance(node.args[0], (ast.List, ast.Dict, ast.Tuple))):
            return node.args[0]
        return node


def _default(value: ast.expr | None, constants: dict[str, ast.expr]) -> str | None:
    """The default as text; ``field(default_factory=F)`` shows what F makes (a lambda's body, ``[]`` for list)."""
    if value is None:
        return None
    if isinstance(value, ast.Call) and isinstance(value.func, ast.Name) and value.func.id == "field":
        keywords = {k.arg: k.value for k in value.keywords}
        if "default" in keywords:
            value = keywords["default"]
        elif "default_factory" in keywords:
            factory = keywords["default_factory"]
            if isinstance(factory, ast.Lambda):
                value = factory.body  # lambda: [...] -> [...]
            elif isinstance(factory, ast.Name) and factory.id in ("list", "dict"):
                value = ast.List(elts=[]) if factory.id == "list" else ast.Dict(keys=[], values=[])
            else:
                value = ast.Call(func=factory, args=[], keywords=[])  # SomeClass -> SomeClass()
        else:
            return None
    inlined = _Inline(constants).visit(ast.parse(ast.unparse(value), mode="eval")).body
    try:  # a literal is shown as YAML flow text (null, true, "outputs", [...]), as a config file writes it
        return json.dumps(ast.literal_eval(inlined), ensure_ascii=False)
    except (ValueError, TypeError):
        return ast.unparse(inlined)  # anything else as its source


def _doc(stmt: ast.stmt | None) -> str:
    if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant) and isinstance(stmt.value.value, str):
        return inspect.cleandoc(stmt.value.value)
    return ""


def _fields(node: ast.ClassDef, constants: dict[str, ast.expr]) -> list[Field]:
    out = []
    body = node.body
    for i, stmt in enumerate(body):
        if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
            continue
        annotation = ast.unparse(stmt.annotation)
        if annotation.startswith(("ClassVar", "typing.ClassVar")):
            continue
        following = body[i + 1] if i + 1 < len(body) else None
        out.append(Field(stmt.target.id, annotation, _default(stmt.value, constants), _doc(following), stmt.annotation))
    return out


def parse_config(path: Path) -> tuple[list[Field], list[tuple[str, str, list[Field]]]]:
    """(top-level keys, [(section name, section docstring, fields), ...]) in declaration order."""
    try:
        source = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigReferenceError(f"config reference: cannot read {path}: {err}") from None
    tree = ast.parse(source, filename=str(path))
    constants = _constants(tree)
    classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef) and _is_dataclass(n)}
    if ROOT_CLASS not in classes:
        raise ConfigReferenceError(f"config reference: no dataclass {ROOT_CLASS} in {path}")
    top, sections = [], []
    for fld in _fields(classes[ROOT_CLASS], constants):
        section_class = fld.annotation.id if isinstance(fld.annotation, ast.Name) else None
        if section_class in classes:
            node = classes[section_class]
            sections.append((fld.name, _doc(node.body[0]) if node.body else "", _fields(node, constants)))
        else:
            top.append(fld)
    return top, sections


_CODE = re.compile(r"(`[^`]*`)")


def _cell(text: str) -> str:
    """Text for one markdown table cell: one line, RST ``code`` as `code`, pipes and angle brackets escaped
    outside code spans (``<run>`` would otherwise be read as an HTML tag)."""
    text = " ".join(text.split())
    text = re.sub(r"``(.+?)``", r"`\1`", text)
    parts = _CODE.split(text)
    for i in range(0, len(parts), 2):  # even parts are outside code spans
        parts[i] = parts[i].replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("|", "\\|")
    return "".join(parts)


def _code(text: str) -> str:
    text = " ".join(text.split())
    fence = "``" if "`" in text else "`"
    pad = " " if fence == "``" else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def _table(prefix: str, fields: list[Field]) -> list[str]:
    lines = ["| key | type | default | description |", "|---|---|---|---|"]
    for fld in fields:
        key = f"{prefix}.{fld.name}" if prefix else fld.name
        if not fld.doc:
            log.warning("config reference: %s in %s has no docstring under it", key, CONFIG_FILE)
        default = "required" if fld.default is None else _code(fld.default)
        lines.append(f"| `{key}` | {_code(fld.type)} | {default} | {_cell(fld.doc)} |")
    return lines


def render(path: Path) -> str:
    top, sections = parse_config(path)
    count = len(top) + sum(len(fields) for _, _, fields in sections)
    if count == 0:
        raise ConfigReferenceError(f"config reference: no config field found in {path}")
    out = [f"<!-- generated from {CONFIG_FILE} by docs/hooks/config_reference.py; edit the docstrings there -->", ""]
    if top:
        out += ["## Top level", ""] + _table("", top) + [""]
    for name, doc, fields in sections:
        if not fields:
            raise ConfigReferenceError(f"config reference: section '{name}' of {path} has no field")
        out += [f"## `{name}`", ""]
        if doc:
            out += [_cell(doc), ""]
        out += _table(name, fields) + [""]
    log.info("config reference: %d keys in %d sections from %s", count, len(sections), CONFIG_FILE)
    return "\n".join(out)


def _config_path(config) -> Path:
    return Path(config.config_file_path).resolve().parent / CONFIG_FILE


def on_config(config):
    # `mkdocs serve` rebuilds when the dataclasses change.
    path = _config_path(config)
    if path.is_file() and str(path) not in config.watch:
        config.watch.append(str(path))
    return config


def on_page_markdown(markdown: str, page, config, files) -> str:
    lines = markdown.splitlines()
    found = sum(line.strip() == PLACEHOLDER for line in lines)
    if found == 0:  # no placeholder line (a mention inside a sentence or code span is left alone)
        return markdown
    if found > 1:
        raise ConfigReferenceError(f"{page.file.src_uri}: the line {PLACEHOLDER} appears {found} times; once only")
    generated = render(_config_path(config))
    return "\n".join(generated if line.strip() == PLACEHOLDER else line for line in lines) + "\n"
