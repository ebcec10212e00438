"""HL7 v2 delimiters and escape sequences (v2.5/v2.7 chapter 2, section 2.7).

Values are split at the delimiters first and each leaf is unescaped
afterwards, so that an escaped delimiter (``\\S\\``) never splits a value and
``\\E\\R\\E\\`` decodes to the text ``\\R\\`` rather than to a repetition
separator.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Delimiters:
    """The separators of one message, from MSH-1 and MSH-2.

    ``truncation`` is the fifth MSH-2 character that v2.7 added; it is never a
    split character, only the meaning of the ``\\P\\`` escape.
    """

    field: str = "|"
    component: str = "^"
    repetition: str = "~"
    escape: str = "\\"
    subcomponent: str = "&"
    truncation: str | None = None

    @property
    def encoding_characters(self) -> str:
        """MSH-2 as sent: component, repetition, escape, subcomponent[, truncation]."""
        chars = self.component + self.repetition + self.escape + self.subcomponent
        return chars + (self.truncation or "")


DEFAULT_DELIMITERS = Delimiters()

# Formatting commands of the FT and TX data types (section 2.7.6) and the
# highlight pair \H\ \N\: text layout, kept literally without a warning.
_FORMATTING = ("H", "N", ".")


def escape(text: str, delimiters: Delimiters = DEFAULT_DELIMITERS) -> str:
    """Escape ``text`` so that it can be sent as one HL7 v2 leaf value.

    Delimiters become ``\\F\\ \\S\\ \\T\\ \\R\\ \\E\\`` (and ``\\P\\`` when the
    message declares a truncation character); CR and LF, which cannot appear
    inside a segment, become ``\\X0D\\`` and ``\\X0A\\``.

    Args:
        text: The value to send.
        delimiters: The delimiters of the message the value goes into.

    Returns:
        The escaped text; :func:`unescape` gives ``text`` back.
    """
    esc = delimiters.escape
    table = {
        esc: f"{esc}E{esc}",
        delimiters.field: f"{esc}F{esc}",
        delimiters.component: f"{esc}S{esc}",
        delimiters.subcomponent: f"{esc}T{esc}",
        delimiters.repetition: f"{esc}R{esc}",
        "\r": f"{esc}X0D{esc}",
        "\n": f"{esc}X0A{esc}",
    }
    if delimiters.truncation:
        table[delimiters.truncation] = f"{esc}P{esc}"
    return text.translate(str.maketrans(table))


def unescape(
    text: str, delimiters: Delimiters = DEFAULT_DELIMITERS, *, charset: str = "ascii"
) -> str:
    """Decode the escape sequences of one leaf value.

    Args:
        text: A leaf value as sent (already split at the delimiters).
        delimiters: The delimiters of the message the value came from.
        charset: Python codec of the message, used for ``\\Xhh\\`` hex data.

    Returns:
        The decoded text. Sequences that cannot be decoded are kept literally;
        use :func:`unescape_with_warnings` to learn about them.
    """
    return unescape_with_warnings(text, delimiters, charset=charset)[0]


def unescape_with_warnings(
    text: str, delimiters: Delimiters = DEFAULT_DELIMITERS, *, charset: str = "ascii"
) -> tuple[str, tuple[str, ...]]:
    """Decode one leaf value and report the sequences kept literally.

    Args:
        text: A leaf value as sent.
        delimiters: The delimiters of the message the value came from.
        charset: Python codec of the message, used for ``\\Xhh\\`` hex data.

    Returns:
        The decoded text and one warning per sequence that was kept as sent.
    """
    esc = delimiters.escape
    if esc not in text:
        return text, ()
    out: list[str] = []
    warnings: list[str] = []
    pos = 0
    while pos < len(text):
        start = text.find(esc, pos)
        if start < 0:
            out.append(text[pos:])
            break
        out.append(text[pos:start])
        stop = text.find(esc, start + 1)
        if stop < 0:
            # The spec leaves an unclosed sequence undefined; keep it as data.
            warnings.append("unterminated escape sequence kept literally")
            out.append(text[start:])
            break
        code = text[start + 1 : stop]
        if not code:
            warnings.append("empty escape sequence kept literally")
            out.append(esc)
            pos = stop
            continue
        decoded = _decode_sequence(code, delimiters, charset)
        if decoded is None:
            if not code.startswith(_FORMATTING):
                warnings.append(f"escape sequence {code[:1]}... kept literally")
            out.append(text[start : stop + 1])
        else:
            out.append(decoded)
        pos = stop + 1
    return "".join(out), tuple(warnings)


def _decode_sequence(code: str, delimiters: Delimiters, charset: str) -> str | None:
    """Return the text an escape sequence encodes, or None if it is unknown."""
    simple = {
        "F": delimiters.field,
        "S": delimiters.component,
        "T": delimiters.subcomponent,
        "R": delimiters.repetition,
        "E": delimiters.escape,
    }
    if code in simple:
        return simple[code]
    if code == "P":
        return delimiters.truncation
    if code.startswith("X") and len(code) > 1:
        try:
            return bytes.fromhex(code[1:]).decode(charset)
        except (ValueError, LookupError):
            return None
    return None
