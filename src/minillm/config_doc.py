"""The config reference, generated from the dataclasses in :mod:`minillm.config`.

The README's "Config reference" section is this module's output (``python -m minillm.config_doc``
rewrites it); a test fails when the two drift apart, so the defaults and their documentation have
one source.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import sys
from pathlib import Path

from minillm import config as C

SECTIONS = [
    ("", C.Config, "Top level"),
    ("teacher.", C.ModelConfig, "`teacher.*` and `student.*` (same keys)"),
    ("student.lora.", C.LoraConfig, "`student.lora.*`"),
    ("data.", C.DataConfig, "`data.*`"),
    ("train.", C.TrainConfig, "`train.*`"),
    ("generation.", C.GenerationConfig, "`generation.*`"),
    ("minillm.", C.MiniLLMConfig, "`minillm.*`"),
    ("kd.", C.KDConfig, "`kd.*`"),
    ("eval.", C.EvalConfig, "`eval.*`"),
]
START, END = "<!-- config-reference:start -->", "<!-- config-reference:end -->"
_FIELD = re.compile(r"^\s+(\w+):\s*[^=]+?(?:=\s*(.+?))?\s*(?:#\s*(.*))?$")


def _comments(cls: type) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in inspect.getsource(cls).splitlines():
        m = _FIELD.match(line)
        if m and m.group(3):
            out[m.group(1)] = m.group(3).strip()
    return out


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        value = f.default_factory()  # type: ignore[misc]
    else:
        return "(required)"
    if dataclasses.is_dataclass(value):
        return "(section)"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return f"`{value}`" if not isinstance(value, str) else f"`{value}`"


def reference_markdown() -> str:
    """Markdown tables of every config key with its default and meaning."""
    parts = []
    for prefix, cls, title in SECTIONS:
        notes = _comments(cls)
        doc = (inspect.getdoc(cls) or "").splitlines()[0]
        rows = []
        for f in dataclasses.fields(cls):
            if prefix == "" and f.name not in ("method", "output_dir", "seed"):
                continue
            meaning = notes.get(f.name, "").replace("|", "\\|")
            rows.append(f"| `{prefix}{f.name}` | {_default(f)} | {meaning} |")
        parts.append(f"#### {title}\n\n{doc}\n\n| key | default | meaning |\n|---|---|---|\n" + "\n".join(rows))
        if cls is C.MiniLLMConfig:
            parts.append(recipe_markdown())
    return "\n\n".join(parts)


def recipe_markdown() -> str:
    """The ``minillm.recipe`` tables: what each recipe sets, beside the default it replaces."""
    defaults = C.Config().to_dict()
    out = []
    for name, table in C.RECIPES.items():
        if not table:
            continue
        rows = []
        for dotted, value in table.items():
            section, key = dotted.split(".")
            rows.append(f"| `{dotted}` | {_value(value)} | {_value(defaults[section][key])} |")
        out.append(f"`minillm.recipe: {name}` sets these keys, each unless the config sets it itself (an explicit key "
                   f"wins; `config.yaml` records the result):\n\n| key | {name} | default (paper) |\n|---|---|---|\n"
                   + "\n".join(rows))
    return "\n\n".join(out)


def _value(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return f"`{value}`"


def update_readme(path: Path) -> bool:
    """Rewrite the generated section of ``path``; return True when it changed."""
    text = path.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{path}: markers {START} / {END} not found")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    new = f"{head}{START}\n{reference_markdown()}\n{END}{tail}"
    if new != text:
        path.write_text(new)
    return new != text


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("README.md")
    print("updated" if update_readme(target) else "up to date")
