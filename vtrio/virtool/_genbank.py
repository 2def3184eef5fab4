"""GenBank flat files: read the parts of a nucleotide record that vtrio uses.

:func:`parse_genbank` reads NCBI's ``efetch`` output (``rettype=gb``) into a
:class:`GenBankRecord`. The format is laid out in columns: a keyword in column 1 starts a
section and its value starts in column 13, on the keyword's line and on each continuation
line; in the feature table a feature's key sits in columns 6-21 and its location and
qualifiers start in column 22; the sequence follows ``ORIGIN`` and ``//`` ends the record.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

__all__ = ["GenBankError", "GenBankRecord", "parse_genbank"]

_HEADER_INDENT = 12  # header values start in column 13
_FEATURE_KEY_INDENT = 5  # feature keys start in column 6
_FEATURE_INDENT = 21  # feature locations and qualifiers start in column 22


class GenBankError(ValueError):
    """The text is not a complete GenBank record with a sequence."""


@dataclass(frozen=True)
class GenBankRecord:
    """The parts of a GenBank nucleotide record vtrio uses.

    ``definition`` is the DEFINITION text on one line without its final period; ``host`` is
    the source feature's ``/host`` qualifier, ``None`` when the record has none; ``sequence``
    is upper case with no spaces or digits.
    """

    accession: str
    version: int
    definition: str
    organism: str
    host: str | None
    sequence: str

    @property
    def accession_version(self) -> str:
        """The versioned accession, as NCBI writes it: ``NC_001367.1``."""
        return f"{self.accession}.{self.version}"


def parse_genbank(text: str) -> GenBankRecord:
    """Read the first record of a GenBank flat file (NCBI's ``rettype=gb`` output).

    Raises :class:`GenBankError` if the text is not a complete GenBank record with a
    sequence.
    """
    entry = _split_entry(text)
    accession, version = _accession_and_version(entry)
    source = _source_qualifiers(entry.features)
    organism = source.get("organism") or _organism_from_source(entry.headers.get("SOURCE", []))
    if not organism:
        raise GenBankError(f"GenBank record {accession} names no organism")
    if not entry.sequence:
        raise GenBankError(
            f"GenBank record {accession} has no sequence (no ORIGIN section, as in CONTIG "
            "records); fetch a record that carries its sequence"
        )
    return GenBankRecord(
        accession=accession,
        version=version,
        definition=entry.header("DEFINITION").removesuffix("."),
        organism=organism,
        host=source.get("host"),
        sequence=entry.sequence,
    )


# --- the record's sections ----------------------------------------------------------------


@dataclass(frozen=True)
class _Entry:
    """One record cut into its parts.

    ``headers`` maps each keyword to its lines, keyword lines included (a repeated keyword,
    such as ``REFERENCE``, gathers all its sections' lines); ``features`` holds the feature
    table's lines below its ``FEATURES`` line; ``sequence`` the letters after ``ORIGIN``.
    """

    headers: dict[str, list[str]]
    features: list[str]
    sequence: str

    def header(self, keyword: str) -> str:
        """A header section's value on one line: the keyword's line and its continuations."""
        if keyword not in self.headers:
            raise GenBankError(f"GenBank record has no {keyword} line")
        lines = self.headers[keyword]
        return " ".join(" ".join(line[_HEADER_INDENT:].split()) for line in lines).strip()


def _split_entry(text: str) -> _Entry:
    """The first record in ``text``, from its ``LOCUS`` line to its ``//`` line, cut up."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("LOCUS")), None)
    if start is None:
        raise GenBankError("not a GenBank record: no LOCUS line")
    headers: dict[str, list[str]] = {}
    features: list[str] = []
    sequence: list[str] = []
    keyword = "LOCUS"
    for line in lines[start:]:
        if line.startswith("//"):
            return _Entry(headers, features, "".join(sequence).upper())
        if line[:1].strip():  # a keyword in column 1 starts a new section
            keyword = line[:_HEADER_INDENT].split()[0]
            if keyword != "ORIGIN":  # the ORIGIN line itself carries no sequence
                headers.setdefault(keyword, []).append(line)
        elif keyword == "ORIGIN":
            sequence.append("".join(ch for ch in line if ch.isalpha()))  # drop counts, spaces
        elif keyword == "FEATURES":
            features.append(line)
        else:
            headers[keyword].append(line)
    raise GenBankError("GenBank record is truncated: no '//' line at its end")


def _accession_and_version(entry: _Entry) -> tuple[str, int]:
    """The primary accession and its version, which VERSION must give for that accession."""
    accessions = entry.header("ACCESSION").split()  # the primary one, then any secondary ones
    versions = entry.header("VERSION").split()
    if not accessions or not versions:
        raise GenBankError("GenBank record has an empty ACCESSION or VERSION line")
    accession = accessions[0]
    versioned = re.fullmatch(re.escape(accession) + r"\.(\d+)", versions[0])
    if versioned is None:
        raise GenBankError(
            f"GenBank VERSION {versions[0]!r} does not match ACCESSION {accession!r}"
        )
    return accession, int(versioned.group(1))


def _organism_from_source(lines: list[str]) -> str:
    """The ORGANISM sub-keyword's name (its lineage lines, with ';' or a final '.', excluded)."""
    name: list[str] = []
    for line in lines:
        label = line[:_HEADER_INDENT].strip()
        if label == "ORGANISM":
            name = [line[_HEADER_INDENT:].strip()]
        elif name and not label:
            value = line[_HEADER_INDENT:].strip()
            if ";" in value or value.endswith("."):
                break  # the lineage starts
            name.append(value)
        elif name:
            break
    return " ".join(name)


# --- the feature table --------------------------------------------------------------------


def _source_qualifiers(feature_lines: list[str]) -> dict[str, str]:
    """The first ``source`` feature's qualifiers, unquoted; a repeated name keeps its first."""
    qualifiers: dict[str, str] = {}
    for name, value in _qualifiers(_first_feature(feature_lines, "source")):
        qualifiers.setdefault(name, _unquote(value))
    return qualifiers


def _first_feature(feature_lines: list[str], key: str) -> list[str]:
    """The lines below the first ``key`` feature's key line, stripped of their indentation."""
    lines: list[str] = []
    inside = False
    for line in feature_lines:
        feature_key = line[_FEATURE_KEY_INDENT:_FEATURE_INDENT].strip()
        if feature_key:  # a new feature starts
            if inside:
                break
            inside = feature_key == key
        elif inside:
            lines.append(line[_FEATURE_INDENT:].strip())
    return lines


def _qualifiers(lines: list[str]) -> Iterator[tuple[str, str]]:
    """``(name, value)`` for each ``/name=value`` in a feature's lines, wrapped values joined.

    A line starting with ``/`` inside an open quote continues the value rather than starting a
    qualifier; lines before the first qualifier (a wrapped location) are skipped. A qualifier
    without ``=`` (``/focus``) has the value ``""``.
    """
    name: str | None = None
    pieces: list[str] = []
    for text in lines:
        inside_quotes = " ".join(pieces).count('"') % 2 == 1  # "" escapes keep the count even
        if text.startswith("/") and not inside_quotes:
            if name is not None:
                yield name, " ".join(pieces)
            name, _, value = text[1:].partition("=")
            pieces = [value] if value else []
        elif name is not None:
            pieces.append(text)
    if name is not None:
        yield name, " ".join(pieces)


def _unquote(value: str) -> str:
    """A qualifier's value without its enclosing quotes, each ``""`` in it read as ``"``."""
    if not value.startswith('"'):
        return value
    value = value[1:-1] if value.endswith('"') and len(value) > 1 else value[1:]
    return value.replace('""', '"')
