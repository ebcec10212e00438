"""English given names and their common nicknames, for duplicate-patient linkage.

A patient registered as "Bill" in one system and "William" in another is
the same person more often than chance. The linkage compares the *roots* of
two given names: the formal names a given name may stand for, so "Bill" and
"William" share the root "william" and "Chris" shares one with both
"Christopher" and "Christine".

The table is written for this module from common usage. It is deliberately
small: it covers the frequent English forms, not every cultural variant.
"""

from __future__ import annotations

import re
from functools import cache

NICKNAMES_BY_GENDER: dict[str, dict[str, tuple[str, ...]]] = {
    "M": {
        "albert": ("al", "bert"),
        "alexander": ("alex", "sandy"),
        "andrew": ("andy", "drew"),
        "anthony": ("tony",),
        "benjamin": ("ben", "benny"),
        "bradley": ("brad",),
        "charles": ("charlie", "chuck"),
        "christopher": ("chris", "kit"),
        "daniel": ("dan", "danny"),
        "donald": ("don", "donny"),
        "douglas": ("doug",),
        "edward": ("ed", "eddie", "ted"),
        "francis": ("frank", "fran"),
        "frederick": ("fred", "freddie"),
        "gerald": ("gerry", "jerry"),
        "gregory": ("greg",),
        "henry": ("hank", "harry"),
        "james": ("jim", "jimmy", "jamie"),
        "jeffrey": ("jeff",),
        "john": ("jack", "johnny"),
        "jonathan": ("jon",),
        "joseph": ("joe", "joey"),
        "joshua": ("josh",),
        "kenneth": ("ken", "kenny"),
        "lawrence": ("larry",),
        "leonard": ("len", "leo"),
        "matthew": ("matt",),
        "michael": ("mike", "mick"),
        "nathaniel": ("nate", "nat"),
        "nicholas": ("nick", "nicky"),
        "patrick": ("pat", "paddy"),
        "peter": ("pete",),
        "raymond": ("ray",),
        "richard": ("rick", "rich", "dick"),
        "robert": ("bob", "rob", "bobby", "bert"),
        "ronald": ("ron", "ronnie"),
        "salvatore": ("sal",),
        "samuel": ("sam", "sammy"),
        "stephen": ("steve",),
        "steven": ("steve",),
        "theodore": ("ted", "theo"),
        "thomas": ("tom", "tommy"),
        "timothy": ("tim", "timmy"),
        "vincent": ("vince", "vinny"),
        "william": ("bill", "will", "billy", "liam"),
        "zachary": ("zach", "zack"),
    },
    "F": {
        "abigail": ("abby",),
        "alexandra": ("alex", "sandy", "lexi"),
        "amanda": ("mandy",),
        "angela": ("angie",),
        "barbara": ("barb", "babs"),
        "catherine": ("cathy", "kate", "cat"),
        "christina": ("chris", "tina"),
        "christine": ("chris", "tina"),
        "cynthia": ("cindy",),
        "deborah": ("deb", "debbie"),
        "dorothy": ("dot", "dottie"),
        "eleanor": ("ellie", "nora"),
        "elizabeth": ("liz", "beth", "betty", "eliza"),
        "gwendolyn": ("gwen",),
        "jacqueline": ("jackie",),
        "jennifer": ("jen", "jenny", "jennie"),
        "jessica": ("jess", "jessie"),
        "josephine": ("jo", "josie"),
        "judith": ("judy",),
        "katherine": ("kathy", "katie", "kate"),
        "kimberly": ("kim",),
        "magdalena": ("lena", "maggie"),
        "margaret": ("maggie", "peggy", "meg"),
        "melissa": ("missy", "mel"),
        "natalie": ("nat",),
        "pamela": ("pam",),
        "patricia": ("pat", "patty", "trish"),
        "rebecca": ("becky",),
        "rosetta": ("rose", "etta"),
        "samantha": ("sam", "sammy"),
        "sandra": ("sandy",),
        "stephanie": ("steph",),
        "susan": ("sue", "susie"),
        "theresa": ("terry", "tess"),
        "valerie": ("val",),
        "victoria": ("vicky", "tori"),
    },
}
"""Formal given names by gender (``M``, ``F``) and the nicknames of each."""

_ROOTS: dict[str, set[str]] = {}
for _names in NICKNAMES_BY_GENDER.values():
    for _formal, _short_forms in _names.items():
        _ROOTS.setdefault(_formal, set()).add(_formal)
        for _short in _short_forms:
            _ROOTS.setdefault(_short, set()).add(_formal)

_NOT_LETTERS = re.compile(r"[^a-z]")


def normalise_name(name: str | None) -> str | None:
    """Return ``name`` in lower case with everything but the letters a-z removed.

    Returns ``None`` for a missing name or one without any letter, so that
    the linkage treats it as missing rather than as a value that can agree.
    """
    if name is None:
        return None
    letters = _NOT_LETTERS.sub("", name.lower())
    return letters or None


@cache
def given_name_roots(name: str | None) -> tuple[str, ...]:
    """Return the sorted formal names that a normalised given name may stand for.

    A name outside the table is its own only root, so two unknown names
    share a root only when they are equal.
    """
    if not name:
        return ()
    return tuple(sorted(_ROOTS.get(name, {name})))


def nicknames_of(formal: str) -> tuple[str, ...]:
    """Return the nicknames of a normalised formal given name (none if unknown)."""
    for names in NICKNAMES_BY_GENDER.values():
        if formal in names:
            return names[formal]
    return ()
