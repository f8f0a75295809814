"""The attributes of Macondo's training sentences: data, not code.

An :class:`Attribute` is a name, a clause template with one field ("was born in {year}") and a
sampler that draws the field's value for one villager from a :class:`SampleContext` (the
seeded RNG, the villager, its earlier attributes). The paper names three (year of birth,
friend, marriage year at least 18 years after birth); the other three of the default six are
of the same kind: causally irrelevant to parenthood.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from knnlm.errors import KnnlmError


@dataclass(frozen=True)
class SampleContext:
    """What a sampler may look at: the seeded RNG, the villager, and its earlier attributes."""

    rng: random.Random
    index: int
    villagers: Sequence[str]
    values: Mapping[str, str]


Sampler = Callable[[SampleContext], Any]


@dataclass(frozen=True)
class Attribute:
    """One attribute: ``template`` is a verb phrase with one ``{field}`` filled by ``sampler``.

    Samplers run in list order per villager, so a sampler can depend on attributes listed
    before it (marriage year needs the birth year).
    """

    name: str
    template: str
    sampler: Sampler = field(compare=False)

    @property
    def field_name(self) -> str:
        fields = [f for _, f, _, _ in string.Formatter().parse(self.template) if f is not None]
        if len(fields) != 1 or not fields[0].isidentifier():
            raise KnnlmError(
                f"attribute {self.name!r}: template {self.template!r} needs exactly one "
                "named placeholder such as {year}"
            )
        return fields[0]

    def render(self, value: str) -> str:
        return self.template.format_map({self.field_name: value})


def year_between(lo: int, hi: int) -> Sampler:
    return lambda ctx: ctx.rng.randint(lo, hi)


def choice_of(options: Sequence[str]) -> Sampler:
    options = tuple(options)
    return lambda ctx: ctx.rng.choice(options)


def other_villager(ctx: SampleContext) -> str:
    """Uniform over every villager except this one."""
    n = len(ctx.villagers)
    if n < 2:
        raise KnnlmError("the friend attribute needs at least 2 villagers")
    j = ctx.rng.randrange(n - 1)
    return ctx.villagers[j + (j >= ctx.index)]


def marriage_year(ctx: SampleContext, latest: int = 2023, min_age: int = 18) -> int:
    """Between 1800 and 2023, and at least 18 years after the villager's birth year."""
    if "birth_year" not in ctx.values:
        raise KnnlmError("the marriage_year attribute needs birth_year listed before it")
    lo = max(1800, int(ctx.values["birth_year"]) + min_age)
    if lo > latest:
        raise KnnlmError(f"birth year {ctx.values['birth_year']} leaves no marriage year")
    return ctx.rng.randint(lo, latest)


TOWNS = (
    "Aracataca", "Barranquilla", "Cartagena", "Fonseca", "Manaure", "Mompox",
    "Riohacha", "Santa Marta", "Sincelejo", "Soledad", "Turbaco", "Valledupar",
)  # fmt: skip
OCCUPATIONS = (
    "baker", "blacksmith", "butcher", "carpenter", "doctor", "farmer", "fisherman",
    "goldsmith", "merchant", "miller", "musician", "painter", "potter", "sailor",
    "shepherd", "shoemaker", "tailor", "teacher", "weaver",
)  # fmt: skip
HOBBIES = (
    "chess", "cooking", "dancing", "fishing", "gardening", "hunting", "painting",
    "poetry", "riding", "singing", "swimming", "walking",
)  # fmt: skip

BIRTH_YEAR = Attribute("birth_year", "was born in {year}", year_between(1800, 2005))
FRIEND = Attribute("friend", "was a friend of {villager}", other_villager)
MARRIAGE_YEAR = Attribute("marriage_year", "married in {year}", marriage_year)
# The paper's other three attributes are lost from our copy; these are of the same kind:
# fixed facts about the villager that say nothing about who the children are.
TOWN = Attribute("town", "lived in {town}", choice_of(TOWNS))
OCCUPATION = Attribute("occupation", "worked as a {occupation}", choice_of(OCCUPATIONS))
HOBBY = Attribute("hobby", "liked {hobby}", choice_of(HOBBIES))
DEFAULT_ATTRIBUTES: tuple[Attribute, ...] = (
    BIRTH_YEAR, FRIEND, MARRIAGE_YEAR, TOWN, OCCUPATION, HOBBY,
)  # fmt: skip


def check_attributes(attributes: Sequence[Attribute]) -> list[Attribute]:
    attributes = list(attributes)
    if not attributes:
        raise KnnlmError("at least one attribute is needed")
    names = [a.name for a in attributes]
    if len(set(names)) != len(names):
        raise KnnlmError(f"attribute names must be distinct: {names}")
    for a in attributes:
        if not isinstance(a, Attribute):
            raise KnnlmError(f"attributes must be Attribute records, got {type(a).__name__}")
        a.field_name  # noqa: B018 - validates the template
    return attributes
