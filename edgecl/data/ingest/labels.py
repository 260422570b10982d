"""Class names: normalisation, the characters and scripts allowed, and look-alike comparison.

A label is NFC-normalised and stripped; then it must be 1..max_length characters with no control, format,
private-use, surrogate or unassigned code point (Unicode categories Cc/Cf/Co/Cs/Cn: zero-width spaces, BOMs
and bidi overrides are invisible or reorder text), no line separators, no slash, not ``.``/``..``. Its
letters must come from one script, or from one of the combinations Unicode's "highly restrictive" profile
(UTS #39) allows: Latin with Han and Hiragana/Katakana, with Han and Bopomofo, or with Han and Hangul. A
label mixing Latin and Cyrillic letters ("сat" with a Cyrillic "с") is nearly always a look-alike, so it is
refused with the letter named.

Two labels are the *same class* for people when their :func:`label_key` is equal: NFKC, case folding and
every character mapped to one representative of its Unicode confusable set (the confusables data shipped by
``confusable-homoglyphs``), spaces collapsed. A new label whose key equals a known class's key is refused
(409) like the known class itself; two labels of one upload with one key are refused (422).
"""

from __future__ import annotations

import functools
import json
import unicodedata
from collections.abc import Mapping, Sequence
from typing import Any

from edgecl.data.ingest.base import Problem, UploadRejected, printable

__all__ = ["check_known", "check_label_set", "label_key", "parse_labels", "validate_label"]

_BAD_CATEGORIES = {
    "Cc": "control character",
    "Cf": "invisible format character",
    "Co": "private-use character",
    "Cs": "unpaired surrogate",
    "Cn": "unassigned code point",
    "Zl": "line separator",
    "Zp": "paragraph separator",
}
_NEUTRAL_SCRIPTS = {"COMMON", "INHERITED", "Unknown"}
_ALLOWED_MIXES = (
    {"LATIN", "HAN", "HIRAGANA", "KATAKANA"},
    {"LATIN", "HAN", "BOPOMOFO"},
    {"LATIN", "HAN", "HANGUL"},
)


def _char_name(ch: str) -> str:
    return f"U+{ord(ch):04X} {unicodedata.name(ch, 'unnamed')}"


def _script(ch: str) -> str:
    from confusable_homoglyphs import categories  # 50 kB of script ranges, loaded on first use

    return str(categories.aliases_categories(ch)[0])


def validate_label(label: Any, max_length: int = 100) -> str:
    """The normalised class name (NFC, stripped), or ``ValueError`` saying what is wrong with it."""
    if not isinstance(label, str):
        raise ValueError(f"class name must be a string, got {type(label).__name__}")
    for ch in label:  # before normalising: NFC would fail on a lone surrogate
        cat = unicodedata.category(ch)
        if cat in _BAD_CATEGORIES:
            raise ValueError(
                f"class name {printable(label)!r} contains {_char_name(ch)} ({_BAD_CATEGORIES[cat]}); "
                "type the name again without it"
            )
    norm = unicodedata.normalize("NFC", label).strip()
    if not norm:
        raise ValueError("class name is empty")
    if len(norm) > max_length:
        raise ValueError(f"class name is longer than {max_length} characters")
    if norm in {".", ".."} or "/" in norm or "\\" in norm:
        raise ValueError(f"class name {norm!r} contains a slash or is '.'/'..'")
    scripts: dict[str, str] = {}
    for ch in norm:
        script = _script(ch)
        if script not in _NEUTRAL_SCRIPTS:
            scripts.setdefault(script, ch)
    if len(scripts) > 1 and not any(set(scripts) <= mix for mix in _ALLOWED_MIXES):
        named = ", ".join(f"{s} ({_char_name(c)})" for s, c in sorted(scripts.items()))
        raise ValueError(
            f"class name {norm!r} mixes letters of several scripts: {named}; a look-alike letter from "
            "another alphabet? type the name in one script"
        )
    return norm


@functools.cache
def _confusable_map() -> dict[str, str]:
    """Character -> representative of its confusable set (single characters; sets merged transitively)."""
    from confusable_homoglyphs import confusables

    parent: dict[str, str] = {}

    def find(x: str) -> str:
        while parent.get(x, x) != x:
            x = parent[x]
        return x

    for char, glyphs in confusables.confusables_data.items():
        if len(char) != 1:
            continue
        for glyph in glyphs:
            other = glyph["c"]
            if len(other) == 1:
                a, b = find(char), find(other)
                if a != b:
                    parent[max(a, b)] = min(a, b)
    return {ch: find(ch) for ch in parent}


def label_key(label: str) -> str:
    """What a person sees in ``label``: NFKC, case folded, look-alike characters mapped to one
    representative, runs of spaces collapsed. Equal keys mean "the same class" to a reader."""
    mapping = _confusable_map()
    text = unicodedata.normalize("NFD", unicodedata.normalize("NFKC", label).casefold())
    text = "".join(mapping.get(ch, ch) for ch in text)
    return " ".join(unicodedata.normalize("NFC", text).split())


def check_label_set(labels: Mapping[str, str]) -> list[Problem]:
    """Problems for labels of one upload that look alike ({label: member naming it}): one class or two?"""
    seen: dict[str, str] = {}
    problems = []
    for label in sorted(labels):
        key = label_key(label)
        if key in seen:
            problems.append(
                Problem(
                    labels[label],
                    f"class {label!r} looks like class {seen[key]!r} of the same upload (they differ only in "
                    "case, spacing or look-alike characters): rename one, or merge them",
                )
            )
        else:
            seen[key] = label
    return problems


def check_known(labels: Mapping[str, str], known: Mapping[str, int] | None) -> None:
    """Raise 409 when a label ({label: member naming it}) is, or looks like, a class of an earlier task
    ({class: task id}); before anything is decoded."""
    if not known:
        return
    keys: dict[str, str] = {}
    for name in sorted(known):
        keys.setdefault(label_key(name), name)
    problems = []
    for label in sorted(labels):
        if label in known:
            problems.append(Problem(label, f"class already in task {known[label]}"))
        elif (match := keys.get(label_key(label))) is not None:
            problems.append(
                Problem(
                    label,
                    f"class looks like {match!r} of task {known[match]} (differs only in case, spacing or "
                    "look-alike characters)",
                )
            )
    if problems:
        names = sorted({p.member for p in problems})
        raise UploadRejected(
            f"class(es) {names} already belong to an earlier task; class-incremental learning takes new "
            "classes only (start the server with --allow-known-classes to accept them anyway)",
            problems,
            status=409,
        )


def parse_labels(
    raw: str | None, filenames: Sequence[str], max_length: int = 100, max_bytes: int = 2**20
) -> list[str]:
    """One normalised label per file from the ``labels`` form field; ``UploadRejected`` explains what is
    wrong. Accepted JSON: a list with one label per file (in upload order), an object ``{filename: label}``
    covering every file, or for a single file a plain string."""
    if raw is None or not raw.strip():
        raise UploadRejected("images need a 'labels' field: a JSON list with one class name per file")
    if len(raw.encode("utf-8", "surrogatepass")) > max_bytes:
        raise UploadRejected(f"'labels' is larger than {max_bytes} bytes")
    try:
        value = json.loads(raw)
    except RecursionError:
        raise UploadRejected("'labels' is nested too deep: send a flat JSON list of class names") from None
    except ValueError as err:  # JSONDecodeError, and integers over Python's digit limit
        raise UploadRejected(f"'labels' is not valid JSON: {printable(str(err))}") from None
    if isinstance(value, str):
        value = [value]
    if isinstance(value, dict):
        if len(set(filenames)) != len(filenames):
            raise UploadRejected("'labels' is an object but file names repeat; send a JSON list instead")
        missing = [f for f in filenames if f not in value]
        extra = sorted(set(value) - set(filenames))
        if missing or extra:
            problems = [Problem(f, "no label for this file") for f in missing]
            problems += [Problem(f, "label given for a file that was not uploaded") for f in extra]
            raise UploadRejected("'labels' does not match the uploaded files", problems)
        value = [value[f] for f in filenames]
    if not isinstance(value, list):
        raise UploadRejected(f"'labels' must be a JSON list of class names, got {type(value).__name__}")
    if len(value) != len(filenames):
        raise UploadRejected(f"{len(filenames)} file(s) uploaded but 'labels' has {len(value)} entries")
    problems = []
    out = []
    for name, label in zip(filenames, value, strict=True):
        try:
            out.append(validate_label(label, max_length))
        except ValueError as err:
            problems.append(Problem(name, str(err)))
    if problems:
        raise UploadRejected("invalid class names in 'labels'", problems)
    first: dict[str, str] = {}
    for name, label in zip(filenames, out, strict=True):
        first.setdefault(label, name)
    problems = check_label_set(first)
    if problems:
        raise UploadRejected("class names in 'labels' look alike", problems)
    return out
