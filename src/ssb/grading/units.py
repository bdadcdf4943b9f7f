"""Compound units ("2 hours 40 minutes") converted with exact factors, and multiple-choice answers graded by their
letter (the rules: :mod:`ssb.grading`)."""

from __future__ import annotations

import re
from fractions import Fraction


from ssb.grading.normalise import plain

_UNITS: dict[str, tuple[str, int]] = {}
for _kind, _factor, _names in (
    ("time", 1, "s sec secs second seconds"), ("time", 60, "min mins minute minutes"),
    ("time", 3600, "h hr hrs hour hours"), ("time", 86400, "day days"), ("time", 604800, "week weeks"),
    ("imperial length", 1, "in inch inches"), ("imperial length", 12, "ft foot feet"),
    ("imperial length", 36, "yd yard yards"), ("imperial length", 63360, "mi mile miles"),
    ("metric length", 1, "mm millimeter millimeters millimetre millimetres"),
    ("metric length", 10, "cm centimeter centimeters centimetre centimetres"),
    ("metric length", 1000, "m meter meters metre metres"),
    ("metric length", 10**6, "km kilometer kilometers kilometre kilometres"),
    ("imperial mass", 1, "oz ounce ounces"), ("imperial mass", 16, "lb lbs pound pounds"),
    ("metric mass", 1, "g gram grams"), ("metric mass", 1000, "kg kilogram kilograms"),
    ("money", 1, "cent cents"), ("money", 100, "dollar dollars"),
):
    for _name in _names.split():
        _UNITS[_name] = (_kind, _factor)
_PART_RE = re.compile(r"(\d+(?:\.\d+)?)\s*([a-z]+)\.?")
_PART_GAP_RE = re.compile(r"[\s,]*(?:and[\s,]*)?")
_GOLD_UNIT_RE = re.compile(r"([+-]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[+-]?\.\d+)\s*(?:([a-z]+)\.?)?")


def parse_compound(s: str) -> tuple[str, Fraction, list[int]] | None:
    """(kind, total in the kind's smallest unit, unit factors) of a compound-unit answer ('2 hours 40 minutes');
    None unless the whole answer is 2+ 'number unit' parts of one kind, largest first (module doc)."""
    if len(s) > 200:
        return None
    p = plain(s).lower()
    parts = list(_PART_RE.finditer(p))
    if len(parts) < 2:
        return None
    pos = 0
    for m in parts:
        if not _PART_GAP_RE.fullmatch(p[pos:m.start()]):
            return None
        pos = m.end()
    if p[pos:].strip(" ."):
        return None
    units = [_UNITS.get(m.group(2)) for m in parts]
    if any(u is None for u in units) or len({u[0] for u in units}) != 1:  # type: ignore[index]
        return None
    factors = [u[1] for u in units]  # type: ignore[index]
    if any(a <= b for a, b in zip(factors, factors[1:])) or any("." in m.group(1) for m in parts[:-1]):
        return None
    total = sum((Fraction(m.group(1)) * f for m, f in zip(parts, factors)), Fraction(0))
    return units[0][0], total, factors  # type: ignore[index]


def compound_matches(compound: tuple[str, Fraction, list[int]], gold: str) -> bool:
    kind, total, factors = compound
    other = parse_compound(gold)
    if other is not None:
        return other[0] == kind and other[1] == total
    m = _GOLD_UNIT_RE.fullmatch(plain(gold).lower())
    if m is None:
        return False
    value = Fraction(m.group(1).replace(",", ""))
    if m.group(2):
        unit = _UNITS.get(m.group(2))
        return unit is not None and unit[0] == kind and total == value * unit[1]
    return any(total == value * f for f in factors)


_CHOICE_GOLD_RE = re.compile(r"\(?\s*([A-J])\s*\)?")
_CHOICE_ANSWER_RE = re.compile(r"(?:\(\s*([A-J])\s*\)|([A-J])\s*[):.])\s*(\S.*)", re.S)
_OTHER_CHOICE_RE = re.compile(r"\(\s*[A-J]\s*\)|\b[A-J]\s*[):]|\bor\b")


def choice_letter(gold: str) -> str | None:
    """'C' for a multiple-choice gold ('\\text{(C)}', '(C)', 'C'); None otherwise."""
    m = _CHOICE_GOLD_RE.fullmatch(plain(gold)) if len(gold) < 40 else None
    return m.group(1) if m else None


def choice_with_text(answer: str) -> str | None:
    """'C' for a choice letter followed by its option text ('(C) Plane', 'C: Plane'); None otherwise."""
    m = _CHOICE_ANSWER_RE.fullmatch(plain(answer)) if len(answer) < 300 else None
    if m is None or _OTHER_CHOICE_RE.search(m.group(3)):
        return None
    return m.group(1) or m.group(2)
