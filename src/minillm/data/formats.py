"""One reader for every instruction-data format, shared by training and evaluation.

:data:`FORMATS` maps a format name to the parser of one raw record (a JSON object or a dataset
row) into one or more :class:`Example` objects. Training (:func:`read_examples`, ``data.format``)
and evaluation (:func:`minillm.eval.testsets.load_test_set`, ``eval.format``) read files through
the same registry, so every format one reads the other reads too. ``auto`` picks the format from
the file's first record (:func:`sniff_format`); the rest of the file must follow it. The formats,
as their public releases are published:

* ``dolly``: databricks-dolly-15k: ``instruction``, optional ``context``, ``response``
  (+ ``category``); optional ``references``, a list of every acceptable answer.
* ``selfinst``: Self-Instruct seed tasks and its user-oriented evaluation set: ``instruction`` +
  ``instances`` = [{``input``, ``output``}, ...] (also as the Hub's dict of lists), one example
  per instance; or flat ``instruction`` / ``input`` / ``output`` (Alpaca's layout).
* ``vicuna``: FastChat question files: ``question_id``, ``category`` and ``turns`` (Vicuna bench
  and MT-bench; the first turn is the prompt, MT-bench's ``reference`` list holds one answer per
  turn) or the older ``text``; an optional reference answer (``reference``, ``references``,
  ``output`` or ``answer``).
* ``sni``: Super-Natural Instructions: a raw task file of the natural-instructions repository
  (one JSON object: ``Definition`` + ``Instances`` = [{``input``, ``output``: [...]}], one example
  per instance), or processed ``definition`` + ``input`` + ``output``, or ``prompt`` + ``output``.
* ``unni``: Unnatural Instructions: the raw release (``instruction`` + ``instances`` =
  [{``input``, ``instruction_with_input``, ``constraints``, ``output``}], and in the full data
  ``reformulations``, whose outputs become extra references of a single instance), or flat
  ``instruction`` / ``input`` / ``output`` (a string or a list).
* ``prompt_response``: ``prompt`` / ``instruction`` / ``question`` with ``response`` /
  ``output`` / ``completion`` / ``answer``, optional ``context`` / ``input`` and ``references``,
  or chat ``messages`` = [{"role", "content"}, ...] whose last assistant turn is the response.

A parser reads structure only: a record without an answer gives an example without one (training
counts and drops it, evaluation refuses it where the format requires an answer), and blank prompts
are judged by the reader that uses them. ``data.columns`` renames a dataset's columns onto our
field names before the format is picked.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from minillm.data.records import load_records
from minillm.errors import UserError

log = logging.getLogger("minillm")

__all__ = ["FORMATS", "Example", "Format", "Parsed", "load_records", "parse_records", "read_examples", "record_to_example",
           "sniff_format"]


@dataclass
class Example:
    """One instruction example. ``references`` holds every acceptable answer."""

    instruction: str
    context: str = ""
    response: str | None = None
    references: list[str] = field(default_factory=list)
    messages: list[dict[str, str]] | None = None  # chat turns before the response
    source: str = ""  # file:line, for error messages
    meta: dict[str, Any] = field(default_factory=dict)


# our field -> the names it goes by in the generic (prompt_response / dolly) records
_ALIASES = {
    "instruction": ("instruction", "prompt", "question"),
    "context": ("context", "input"),
    "response": ("response", "output", "completion", "answer"),
    "messages": ("messages",),
    "references": ("references",),
}
_ALIAS_OF = {"prompt": "instruction"}  # data.columns keys that are not group names
_META_KEYS = ("category", "kind", "id", "task", "question_id", "name", "motivation_app")


def _text(value: Any, where: str, name: str) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise UserError(f"{where}: field {name!r} must be a string, got {type(value).__name__}")


def _meta(rec: dict[str, Any]) -> dict[str, Any]:
    return {k: rec[k] for k in _META_KEYS if k in rec and isinstance(rec[k], (str, int, float)) and not isinstance(rec[k], bool)}


def _first(rec: dict[str, Any], keys: tuple[str, ...]) -> str | None:
    return next((k for k in keys if k in rec), None)


def record_to_example(rec: Any, where: str) -> Example:
    """The generic record (``prompt_response`` and ``dolly``): field aliases, chat ``messages``,
    ``references``; raise a :class:`UserError` naming ``where`` for a record it cannot use."""
    if not isinstance(rec, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(rec).__name__}")

    def get(name: str) -> tuple[str | None, Any]:
        key = _first(rec, _ALIASES[name])
        return key, (rec[key] if key is not None else None)

    _, messages = get("messages")
    if messages is not None:
        if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages):
            raise UserError(f"{where}: 'messages' must be a list of {{'role': ..., 'content': ...}} objects")
        msgs = [{"role": _text(m["role"], where, "role"), "content": _text(m["content"], where, "content")} for m in messages]
        response = None
        if msgs and msgs[-1]["role"] == "assistant":
            response = msgs[-1]["content"]
            msgs = msgs[:-1]
        users = [m for m in msgs if m["role"] == "user"]
        if not users:
            raise UserError(f"{where}: 'messages' has no user turn to answer")
        return Example(instruction=users[-1]["content"], response=response, references=[response] if response is not None else [],
                       messages=msgs, source=where, meta=_meta(rec))

    name, instruction = get("instruction")
    if name is None:
        raise UserError(
            f"{where}: no prompt field; expected 'instruction' (Dolly), 'prompt' or 'messages'; "
            f"found {sorted(map(str, rec))} (map other names with data.columns)"
        )
    _, context = get("context")
    rname, response = get("response")
    _, refs = get("references")
    references: list[str] = []
    if isinstance(response, list):  # S-NI style: several outputs
        references = [_text(r, where, rname or "response") for r in response]
        response = references[0] if references else None
    elif response is not None:
        response = _text(response, where, rname or "response")
        references = [response]
    if refs is not None:
        if not isinstance(refs, list):
            raise UserError(f"{where}: 'references' must be a list of strings")
        references = [_text(r, where, "references") for r in refs] or references
        if response is None and references:
            response = references[0]
    return Example(instruction=_text(instruction, where, name), context=_text(context, where, "context"), response=response,
                   references=references, source=where, meta=_meta(rec))


# --- helpers of the dataset-specific parsers --------------------------------------------------------


def _str(rec: dict[str, Any], key: str, where: str, fmt: str, required: bool = True) -> str:
    value = rec.get(key)
    if value is None:
        if required:
            raise UserError(f"{where}: {fmt} record needs a {key!r} field; found {sorted(map(str, rec))} (or set the format)")
        return ""
    return _text(value, where, key)


def _refs(value: Any, where: str, key: str) -> list[str]:
    """One reference string or a non-empty list of them."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return list(value)
    raise UserError(f"{where}: field {key!r} must be a string or a non-empty list of strings, got {value!r:.80}")


def _example(instruction: str, context: str, refs: list[str], where: str, meta: dict[str, Any]) -> Example:
    return Example(instruction=instruction, context=context, response=refs[0] if refs else None, references=refs,
                   source=where, meta=meta)


def _instances(value: Any, where: str, key: str) -> list[tuple[str, Any]]:
    """(location, instance) pairs of a list of ``{input, output}`` objects, or of the dict of
    parallel lists a Hugging Face dataset makes of such a list."""
    if isinstance(value, dict) and value and all(isinstance(v, list) for v in value.values()):
        n = {len(v) for v in value.values()}
        if len(n) == 1:
            value = [dict(zip(value, row)) for row in zip(*value.values())]
    if not isinstance(value, list) or not value:
        raise UserError(f"{where}: {key!r} must be a non-empty list of {{'input': ..., 'output': ...}} objects")
    return [(f"{where} ({key}[{j}])", inst) for j, inst in enumerate(value)]


def _instance_example(instruction: str, inst: Any, where: str, meta: dict[str, Any]) -> Example:
    """One example from an ``{input, output}`` instance (Self-Instruct, S-NI, UnNI)."""
    if not isinstance(inst, dict):
        raise UserError(f"{where}: expected an object with 'input' and 'output', got {type(inst).__name__}")
    if "output" not in inst:
        raise UserError(f"{where}: field 'output' is missing; an instance is an object with 'input' and 'output'")
    return _example(instruction, _text(inst.get("input"), where, "input"), _refs(inst["output"], where, "output"), where,
                    _meta(inst) or meta)


# --- one parser per format ------------------------------------------------------------------------


def _selfinst(rec: dict[str, Any], where: str) -> list[Example]:
    instruction = _str(rec, "instruction", where, "selfinst")
    if "instances" in rec:
        return [_instance_example(instruction, inst, at, _meta(rec)) for at, inst in _instances(rec["instances"], where, "instances")]
    key = _first(rec, ("output", "response"))
    refs = _refs(rec[key], where, key) if key is not None else []
    return [_example(instruction, _str(rec, "input", where, "selfinst", required=False), refs, where, _meta(rec))]


def _vicuna(rec: dict[str, Any], where: str) -> list[Example]:
    meta = _meta(rec)
    if "turns" in rec:  # FastChat llm_judge question files (Vicuna bench, MT-bench)
        turns = rec["turns"]
        if not isinstance(turns, list) or not turns or not all(isinstance(t, str) for t in turns):
            raise UserError(f"{where}: 'turns' must be a non-empty list of strings (the user turns of the conversation)")
        refs: list[str] = []
        if rec.get("reference") is not None:  # MT-bench: one reference answer per turn
            ref = rec["reference"]
            refs = _refs(ref[0] if isinstance(ref, list) and ref else ref, where, "reference")
        if len(turns) > 1:
            meta["follow_up_turns"] = len(turns) - 1
        return [_example(turns[0], "", refs, where, meta)]
    key = _first(rec, ("text", "question", "instruction", "prompt"))
    if key is None:
        raise UserError(f"{where}: vicuna record needs 'turns', 'text' or 'question'; found {sorted(map(str, rec))}")
    ref_key = _first(rec, ("reference", "references", "output", "answer"))
    refs = _refs(rec[ref_key], where, ref_key) if ref_key is not None and rec[ref_key] is not None else []
    return [_example(_str(rec, key, where, "vicuna"), "", refs, where, meta)]


def _sni(rec: dict[str, Any], where: str) -> list[Example]:
    if "Definition" in rec or "Instances" in rec:  # a raw natural-instructions task file
        definition = rec.get("Definition")
        if isinstance(definition, list) and all(isinstance(d, str) for d in definition):
            definition = "\n".join(definition)
        if not isinstance(definition, str):
            raise UserError(f"{where}: 'Definition' must be a string or a list of strings")
        return [_instance_example(definition, inst, at, _meta(rec)) for at, inst in _instances(rec.get("Instances"), where, "Instances")]
    refs = _refs(rec["output"], where, "output") if rec.get("output") is not None else []
    if "definition" in rec:
        return [_example(_str(rec, "definition", where, "sni"), _str(rec, "input", where, "sni", required=False), refs, where,
                         _meta(rec))]
    if "prompt" in rec:
        return [_example(_str(rec, "prompt", where, "sni"), "", refs, where, _meta(rec))]
    raise UserError(f"{where}: sni record needs 'definition' (+ 'input') or 'prompt'; found {sorted(map(str, rec))}")


def _unni(rec: dict[str, Any], where: str) -> list[Example]:
    instruction = _str(rec, "instruction", where, "unni")
    if "instances" in rec and "output" not in rec:  # the raw release
        instances = _instances(rec["instances"], where, "instances")
        if len(instances) > 1:  # reformulations rephrase a single instance; several instances stand alone
            return [_instance_example(instruction, inst, at, _meta(rec)) for at, inst in instances]
        ex = _instance_example(instruction, instances[0][1], instances[0][0], _meta(rec))
        context, refs = ex.context, ex.references
    else:
        context = _str(rec, "input", where, "unni", required=False)
        refs = _refs(rec["output"], where, "output") if rec.get("output") is not None else []
    reforms = rec.get("reformulations") or []
    if not isinstance(reforms, list):
        raise UserError(f"{where}: 'reformulations' must be a list of objects with an 'output'")
    for j, ref in enumerate(reforms):
        at = f"{where} (reformulations[{j}])"
        if not isinstance(ref, dict) or "output" not in ref:
            raise UserError(f"{at}: expected an object with an 'output'")
        refs += [r for r in _refs(ref["output"], at, "output") if r not in refs]
    return [_example(instruction, context, refs, where, _meta(rec))]


def _generic(rec: dict[str, Any], where: str) -> list[Example]:
    return [record_to_example(rec, where)]


@dataclass(frozen=True)
class Format:
    """A registered format: its record parser and the field that holds a record's answer.

    ``answer`` names the field evaluation requires (a test set of this format must carry
    references); None: answers are optional (Vicuna questions, plain prompts)."""

    name: str
    parse: Callable[[dict[str, Any], str], list[Example]]
    answer: str | None


FORMATS: dict[str, Format] = {
    "dolly": Format("dolly", _generic, "response"),
    "selfinst": Format("selfinst", _selfinst, "output"),
    "vicuna": Format("vicuna", _vicuna, None),
    "sni": Format("sni", _sni, "output"),
    "unni": Format("unni", _unni, "output"),
    "prompt_response": Format("prompt_response", _generic, None),
}


def _looks_unni(instances: Any) -> bool:
    first = instances[0] if isinstance(instances, list) and instances else instances
    return isinstance(first, dict) and bool(set(first) & {"instruction_with_input", "constraints"})


def sniff_format(rec: Any, where: str = "", key: str = "data.format") -> str:
    """Guess a record's format from its fields (see the module docstring); ``key`` is the config
    key that sets the format by hand, named when the fields say nothing."""
    if not isinstance(rec, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    keys = set(rec)
    answers = {"response", "output", "answer", "completion", "references"}
    if "messages" in keys:
        return "prompt_response"
    if keys & {"definition", "Definition", "Instances"}:
        return "sni"
    if "turns" in keys:
        return "vicuna"
    if "reformulations" in keys:
        return "unni"
    if "instances" in keys:
        return "unni" if _looks_unni(rec["instances"]) else "selfinst"
    if "instruction" in keys and "response" in keys:
        return "dolly"
    if "instruction" in keys and "output" in keys:
        return "unni" if isinstance(rec["output"], list) else "selfinst"
    if "prompt" in keys and isinstance(rec.get("output"), list):
        return "sni"
    if keys & {"text", "question"} and not keys & answers:
        return "vicuna"
    if keys & {"prompt", "instruction", "question"}:
        return "prompt_response"
    what = "test-set" if key.startswith("eval") else "data"
    raise UserError(
        f"{where}: cannot tell the {what} format from the fields {sorted(map(str, keys))}: no prompt field ('instruction', "
        f"'prompt', 'question', 'text', 'turns' or 'messages'); map yours with data.columns or set {key} to one of {sorted(FORMATS)}"
    )


def apply_columns(rec: Any, columns: dict[str, str], where: str) -> Any:
    """``data.columns`` (our field -> dataset column): the mapped column takes our field's name,
    and wins over any other name the field goes by."""
    if not columns or not isinstance(rec, dict):
        return rec
    for ours, col in columns.items():
        if col not in rec:
            raise UserError(f"{where}: column {col!r} (data.columns.{ours}) is missing; fields: {sorted(map(str, rec))}")
    out = dict(rec)
    for ours, col in columns.items():
        for alias in _ALIASES[_ALIAS_OF.get(ours, ours)]:
            out.pop(alias, None)
        out[ours] = rec[col]
    return out


@dataclass
class Parsed:
    """One raw record and the examples its format made of it."""

    where: str
    record: Any
    format: Format
    examples: list[Example]


def parse_records(source: str, fmt: str = "auto", split: str = "train", columns: dict[str, str] | None = None,
                  key: str = "data.format") -> Iterator[Parsed]:
    """Read ``source`` record by record through the registry (``fmt`` or the format of the first
    record); ``key`` is the config key that chooses the format, named in errors."""
    if fmt != "auto" and fmt not in FORMATS:
        raise UserError(f"{key}: unknown format {fmt!r}; choose auto or one of {sorted(FORMATS)}")
    chosen = None if fmt == "auto" else FORMATS[fmt]
    follow_ups = 0
    for where, raw in load_records(source, split):
        rec = apply_columns(raw, columns or {}, where)
        if chosen is None:
            chosen = FORMATS[sniff_format(rec, where, key)]
        if not isinstance(rec, dict):
            raise UserError(f"{where}: expected a JSON object, got {type(rec).__name__}")
        examples = chosen.parse(rec, where)
        follow_ups += sum(1 for ex in examples if ex.meta.get("follow_up_turns"))
        yield Parsed(where, rec, chosen, examples)
    if follow_ups:
        log.info("%s: %d questions have follow-up turns; only the first turn is asked (single-turn use)", source, follow_ups)


def read_examples(source: str, split: str = "train", columns: dict[str, str] | None = None, fmt: str = "auto") -> list[Example]:
    """Every example of ``source`` (training data), in file order."""
    out = [ex for parsed in parse_records(source, fmt, split, columns) for ex in parsed.examples]
    if not out:
        raise UserError(f"{source}: no records found")
    return out
