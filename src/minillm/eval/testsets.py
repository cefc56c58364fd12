"""Test-set loaders for the paper's five evaluation sets and plain prompt/response files.

Each loader turns one raw record into one or more :class:`~minillm.data.formats.Example`
(``instruction``, ``context``, ``references``; ``response`` = the first reference) and names the
file and line of a record it cannot use. Formats (``eval.format``):

* ``dolly``: ``instruction``, optional ``context``, ``response``; optional ``references`` (a list,
  every acceptable answer; replaces ``[response]``).
* ``selfinst``: user-oriented Self-Instruct, either ``instruction`` + ``instances`` =
  [{``input``, ``output``}, ...] (one example per instance) or flat ``instruction`` / ``input`` /
  ``output``.
* ``vicuna``: ``text`` or ``question`` (+ ``category``), with an optional reference answer
  (``reference``, ``references``, ``output`` or ``answer``, as the paper scores Vicuna's questions
  against reference answers); without one, Rouge-L, exact match and the LM loss are n/a and only
  the judge and reference-free metrics apply.
* ``sni``: Super-Natural Instructions, ``definition`` + ``input`` + ``output`` (a string or a list
  of references), or ``prompt`` + ``output``, or a raw task file of the natural-instructions
  repository (one JSON object: ``Definition`` + ``Instances`` = [{``input``, ``output``: [...]}],
  one example per instance).
* ``unni``: Unnatural Instructions, ``instruction`` + ``input`` + ``output`` (string or list), or
  the raw form with ``instances`` = [{``input``, ``output``}, ...]; the ``output`` of each entry of
  an optional ``reformulations`` list is an extra reference (of the single instance).
* ``prompt_response``: anything :func:`minillm.data.formats.record_to_example` reads (``prompt`` /
  ``response``, Dolly fields, chat ``messages``, ``references``).

``auto`` picks the format from the first record's fields (:func:`sniff_format`); the rest of the
file must then follow that format. Every example must have a non-blank prompt and non-blank
references (a blank reference would make an empty answer an exact match).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from minillm.data.formats import Example, load_records, record_to_example
from minillm.errors import UserError

FORMATS = ("auto", "dolly", "selfinst", "vicuna", "sni", "unni", "prompt_response")


@dataclass
class TestSet:
    """A loaded test set: the resolved format and its examples (in file order)."""

    source: str
    format: str
    examples: list[Example]

    __test__ = False  # not a pytest class

    @property
    def has_references(self) -> bool:
        return any(ex.references for ex in self.examples)


# --- field helpers -----------------------------------------------------------------------------


def _str(rec: dict[str, Any], key: str, where: str, fmt: str, required: bool = True) -> str:
    value = rec.get(key)
    if value is None:
        if required:
            raise UserError(f"{where}: {fmt} record needs a {key!r} field; found {sorted(rec)} (or set eval.format)")
        return ""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise UserError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
    return value


def _refs(value: Any, where: str, key: str) -> list[str]:
    """One reference string or a non-empty list of them."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return list(value)
    raise UserError(f"{where}: field {key!r} must be a string or a non-empty list of strings, got {value!r:.80}")


def _first(rec: dict[str, Any], keys: tuple[str, ...]) -> str | None:
    return next((k for k in keys if k in rec), None)


def _example(instruction: str, context: str, refs: list[str], where: str, meta: dict[str, Any] | None = None) -> Example:
    if not instruction.strip():
        raise UserError(f"{where}: the instruction is empty")
    return Example(
        instruction=instruction, context=context, response=refs[0] if refs else None, references=refs,
        source=where, meta=meta or {},
    )


def _meta(rec: dict[str, Any], keys: tuple[str, ...] = ("category", "kind", "id", "task")) -> dict[str, Any]:
    return {k: rec[k] for k in keys if k in rec and isinstance(rec[k], (str, int, float))}


# --- one parser per format -----------------------------------------------------------------------


def _dolly(rec: dict[str, Any], where: str) -> list[Example]:
    instruction = _str(rec, "instruction", where, "dolly")
    context = _str(rec, "context", where, "dolly", required=False)
    if "references" in rec:
        refs = _refs(rec["references"], where, "references")
    else:
        refs = [_str(rec, "response", where, "dolly")]
    return [_example(instruction, context, refs, where, _meta(rec))]


def _selfinst(rec: dict[str, Any], where: str) -> list[Example]:
    instruction = _str(rec, "instruction", where, "selfinst")
    if "instances" in rec:
        instances = rec["instances"]
        if not isinstance(instances, list) or not instances:
            raise UserError(f"{where}: 'instances' must be a non-empty list of {{'input': ..., 'output': ...}} objects")
        out = []
        for j, inst in enumerate(instances):
            at = f"{where} (instances[{j}])"
            if not isinstance(inst, dict):
                raise UserError(f"{at}: expected an object with 'input' and 'output'")
            refs = _refs(inst.get("output"), at, "output")
            out.append(_example(instruction, _str(inst, "input", at, "selfinst", required=False), refs, at, _meta(rec)))
        return out
    key = _first(rec, ("output", "response"))
    if key is None:
        raise UserError(f"{where}: selfinst record needs 'instances' or an 'output'; found {sorted(rec)}")
    context = _str(rec, "input", where, "selfinst", required=False)
    return [_example(instruction, context, _refs(rec[key], where, key), where, _meta(rec))]


def _vicuna(rec: dict[str, Any], where: str) -> list[Example]:
    key = _first(rec, ("text", "question", "instruction", "prompt"))
    if key is None:
        raise UserError(f"{where}: vicuna record needs a 'text' or 'question' field; found {sorted(rec)}")
    ref_key = _first(rec, ("reference", "references", "output", "answer"))
    refs = _refs(rec[ref_key], where, ref_key) if ref_key is not None else []
    return [_example(_str(rec, key, where, "vicuna"), "", refs, where, _meta(rec))]


def _sni(rec: dict[str, Any], where: str) -> list[Example]:
    if "Definition" in rec or "Instances" in rec:
        return _sni_task(rec, where)
    if "output" not in rec:
        raise UserError(f"{where}: sni record needs an 'output' (a list of references); found {sorted(rec)}")
    refs = _refs(rec["output"], where, "output")
    if "definition" in rec:
        return [_example(_str(rec, "definition", where, "sni"), _str(rec, "input", where, "sni", required=False), refs, where, _meta(rec))]
    if "prompt" in rec:
        return [_example(_str(rec, "prompt", where, "sni"), "", refs, where, _meta(rec))]
    raise UserError(f"{where}: sni record needs 'definition' (+ 'input') or 'prompt'; found {sorted(rec)}")


def _sni_task(rec: dict[str, Any], where: str) -> list[Example]:
    """A raw natural-instructions task file: ``Definition`` (a string or list) + ``Instances``."""
    definition = rec.get("Definition")
    if isinstance(definition, list) and all(isinstance(d, str) for d in definition):
        definition = "\n".join(definition)
    if not isinstance(definition, str):
        raise UserError(f"{where}: 'Definition' must be a string or a list of strings")
    instances = rec.get("Instances")
    if not isinstance(instances, list) or not instances:
        raise UserError(f"{where}: 'Instances' must be a non-empty list of {{'input': ..., 'output': [...]}} objects")
    return [_instance_example(definition, inst, f"{where} (Instances[{j}])", "sni", _meta(inst) or _meta(rec))
            for j, inst in enumerate(instances)]


def _unni(rec: dict[str, Any], where: str) -> list[Example]:
    instruction = _str(rec, "instruction", where, "unni")
    if "instances" in rec and "output" not in rec:  # the raw release: one example per instance
        instances = rec["instances"]
        if not isinstance(instances, list) or not instances:
            raise UserError(f"{where}: 'instances' must be a non-empty list of {{'input': ..., 'output': ...}} objects")
        if len(instances) > 1:  # reformulations rephrase a single instance; several instances stand alone
            return [_instance_example(instruction, inst, f"{where} (instances[{j}])", "unni", _meta(rec))
                    for j, inst in enumerate(instances)]
        rec = {**rec, **_instance(instances[0], f"{where} (instances[0])")}
    if "output" not in rec:
        raise UserError(f"{where}: unni record needs an 'output' (or 'instances'); found {sorted(rec)}")
    refs = _refs(rec["output"], where, "output")
    reforms = rec.get("reformulations") or []
    if not isinstance(reforms, list):
        raise UserError(f"{where}: 'reformulations' must be a list of objects with an 'output'")
    for j, ref in enumerate(reforms):
        if not isinstance(ref, dict) or "output" not in ref:
            raise UserError(f"{where} (reformulations[{j}]): expected an object with an 'output'")
        for r in _refs(ref["output"], f"{where} (reformulations[{j}])", "output"):
            if r not in refs:
                refs.append(r)
    context = _str(rec, "input", where, "unni", required=False)
    return [_example(instruction, context, refs, where, _meta(rec))]


def _instance(inst: Any, where: str) -> dict[str, Any]:
    if not isinstance(inst, dict) or "output" not in inst:
        raise UserError(f"{where}: expected an object with 'input' and 'output'")
    return {"input": inst.get("input", ""), "output": inst["output"]}


def _instance_example(instruction: str, inst: Any, where: str, fmt: str, meta: dict[str, Any]) -> Example:
    """One example from an ``{input, output}`` instance of a raw S-NI or UnNI record."""
    piece = _instance(inst, where)
    return _example(instruction, _str(piece, "input", where, fmt, required=False), _refs(piece["output"], where, "output"),
                    where, meta)


def _prompt_response(rec: dict[str, Any], where: str) -> list[Example]:
    ex = record_to_example(rec, where)
    if ex.response is not None and not ex.references:
        ex.references = [ex.response]
    ex.meta.update(_meta(rec))
    return [ex]


PARSERS: dict[str, Callable[[dict[str, Any], str], list[Example]]] = {
    "dolly": _dolly,
    "selfinst": _selfinst,
    "vicuna": _vicuna,
    "sni": _sni,
    "unni": _unni,
    "prompt_response": _prompt_response,
}


def sniff_format(rec: Any, where: str = "") -> str:
    """Guess a record's format from its fields (see the module docstring for each format)."""
    if not isinstance(rec, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    keys = set(rec)
    if keys & {"definition", "Definition"}:
        return "sni"
    if "reformulations" in keys:
        return "unni"
    if "instances" in keys:
        return "selfinst"
    if "instruction" in keys and "response" in keys:
        return "dolly"
    if "instruction" in keys and "output" in keys:
        return "unni" if isinstance(rec["output"], list) else "selfinst"
    if "prompt" in keys and isinstance(rec.get("output"), list):
        return "sni"
    if keys & {"text", "question"} and not keys & {"response", "output", "answer", "completion", "references"}:
        return "vicuna"
    if keys & {"prompt", "messages", "instruction", "question"}:
        return "prompt_response"
    raise UserError(
        f"{where}: cannot tell the test-set format from the fields {sorted(keys)}; "
        f"set eval.format to one of {FORMATS[1:]}"
    )


def _check_example(ex: Example) -> None:
    prompt = ex.instruction if ex.messages is None else ex.messages[-1]["content"] if ex.messages else ""
    if not prompt.strip():
        raise UserError(f"{ex.source}: the prompt is empty")
    for i, ref in enumerate(ex.references):
        if not ref.strip():
            raise UserError(f"{ex.source}: reference {i + 1} of {len(ex.references)} is blank; fill it in or drop the record")


def load_test_set(source: str, fmt: str = "auto", max_examples: int | None = None, split: str = "test") -> TestSet:
    """Read and validate a test set (JSONL / JSON file, saved or Hub dataset) into examples.

    ``max_examples`` keeps the first N examples (after instances are expanded).
    """
    if fmt not in FORMATS:
        raise UserError(f"eval.format: unknown format {fmt!r}; choose one of {FORMATS}")
    examples: list[Example] = []
    resolved = None if fmt == "auto" else fmt
    for where, rec in load_records(source, split, allow_object=True):
        if resolved is None:
            resolved = sniff_format(rec, where)
        if not isinstance(rec, dict):
            raise UserError(f"{where}: expected a JSON object, got {type(rec).__name__}")
        for ex in PARSERS[resolved](rec, where):
            _check_example(ex)
            examples.append(ex)
        if max_examples is not None and len(examples) >= max_examples:
            examples = examples[:max_examples]
            break
    if not examples or resolved is None:
        raise UserError(f"{source}: no records found")
    return TestSet(source=source, format=resolved, examples=examples)
