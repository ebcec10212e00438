"""Read YAML and CSV configuration files, keeping the line of every value.

Validation errors become :class:`~carebridge.errors.ConfigurationError` with
the file, the 1-based line and the field, so the person fixing the file can
go straight to it. YAML lines come from the marks of PyYAML's composed node
tree; CSV lines are physical lines (a quoted field may span several).
"""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pydantic
import yaml

from carebridge.errors import ConfigurationError

ModelT = TypeVar("ModelT", bound=pydantic.BaseModel)


@dataclass(frozen=True)
class YamlDocument:
    """A parsed YAML file: its data and the node tree the data came from."""

    path: Path
    data: Any
    root: yaml.Node

    def line_of(self, location: Sequence[str | int]) -> int:
        """Return the 1-based line of the value at ``location``.

        Walks as far down ``location`` as the file goes: for a missing key
        this is the line of the mapping that should hold it.
        """
        node = self.root
        for step in location:
            child = _child(node, step)
            if child is None:
                break
            node = child
        return node.start_mark.line + 1


@dataclass(frozen=True)
class CsvRow:
    """One validated CSV record and the physical line it starts on."""

    line: int
    value: Any


def _child(node: yaml.Node, step: str | int) -> yaml.Node | None:
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            if key.value == step:
                return value
    if isinstance(node, yaml.SequenceNode) and isinstance(step, int):
        return node.value[step] if 0 <= step < len(node.value) else None
    return None


def read_yaml(path: Path) -> YamlDocument:
    """Parse a YAML file with the safe loader, refusing duplicate keys.

    Args:
        path: The file.

    Returns:
        The data and its node tree.

    Raises:
        ConfigurationError: If the file is missing, not YAML, empty, or
            repeats a key in one mapping (PyYAML would keep the last silently).
    """
    text = _read(path)
    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
        if root is None:
            raise ConfigurationError("file is empty", path=str(path), line=1)
        _refuse_duplicate_keys(path, root)
        data = loader.construct_document(root)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else None
        raise ConfigurationError(
            f"not valid YAML: {exc.problem}", path=str(path), line=line
        ) from exc
    finally:
        loader.dispose()
    return YamlDocument(path, data, root)


def _refuse_duplicate_keys(path: Path, node: yaml.Node) -> None:
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key, value in node.value:
            if key.value in seen:
                raise ConfigurationError(
                    "duplicate key",
                    path=str(path),
                    line=key.start_mark.line + 1,
                    field=key.value,
                )
            seen.add(key.value)
            _refuse_duplicate_keys(path, value)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _refuse_duplicate_keys(path, item)


def _describe(problem: Mapping[str, Any]) -> str:
    """Return pydantic's message with the rejected value and what to do."""
    message = str(problem["msg"])
    if problem.get("type") == "missing":
        return f"{message}; add it and restart"
    value = problem.get("input")
    if isinstance(value, (str, int, float, bool)) or value is None:
        return f"{message} (got {value!r}); correct it and restart"
    return f"{message}; correct it and restart"


def validate_yaml(document: YamlDocument, model: type[ModelT]) -> ModelT:
    """Validate a YAML document against a pydantic model.

    Raises:
        ConfigurationError: At the line of the first failing value, naming
            its dotted path (e.g. ``departments.2.revenue_account``).
    """
    try:
        return model.model_validate(document.data)
    except pydantic.ValidationError as exc:
        problem = exc.errors()[0]
        location = problem["loc"]
        raise ConfigurationError(
            _describe(problem),
            path=str(document.path),
            line=document.line_of(location),
            field=".".join(str(step) for step in location) or None,
        ) from None


def read_csv(
    path: Path, model: type[ModelT], *, key: Sequence[str] = ()
) -> list[CsvRow]:
    """Read and validate a CSV file whose first line is the header.

    Blank lines are skipped. Cells are stripped; an empty cell is ``None``.

    Args:
        path: The file.
        model: Pydantic model of one row; its fields are the columns.
        key: Fields that must be unique across rows.

    Returns:
        The rows in file order, each with its line.

    Raises:
        ConfigurationError: For a missing or unknown column, an invalid
            value, or a repeated key, naming line and field.
    """
    lines = _read(path).splitlines(keepends=True)
    reader = csv.reader(lines)
    header = [name.strip() for name in next(reader, [])]
    _check_header(path, header, model)
    rows: list[CsvRow] = []
    seen: dict[tuple[Any, ...], int] = {}
    previous_end = reader.line_num
    for record in reader:
        line, previous_end = previous_end + 1, reader.line_num
        if not any(cell.strip() for cell in record):
            continue
        if len(record) != len(header):
            raise ConfigurationError(
                f"expected {len(header)} columns, found {len(record)}",
                path=str(path),
                line=line,
            )
        cells = {name: (cell.strip() or None) for name, cell in zip(header, record)}
        value = _validate_row(path, line, model, cells)
        rows.append(CsvRow(line, value))
        if key:
            _check_unique(path, line, key, value, seen)
    return rows


def _check_header(
    path: Path, header: list[str], model: type[pydantic.BaseModel]
) -> None:
    fields = model.model_fields
    required = [name for name, info in fields.items() if info.is_required()]
    missing = [name for name in required if name not in header]
    unknown = [name for name in header if name not in fields]
    if missing or unknown:
        detail = "; ".join(
            part
            for part in (
                f"missing column(s) {', '.join(missing)}" if missing else "",
                f"unknown column(s) {', '.join(unknown)}" if unknown else "",
            )
            if part
        )
        raise ConfigurationError(
            detail, path=str(path), line=1, field=(missing or unknown)[0]
        )


def _validate_row(
    path: Path, line: int, model: type[ModelT], cells: dict[str, Any]
) -> ModelT:
    present = {name: value for name, value in cells.items() if value is not None}
    try:
        return model.model_validate(present)
    except pydantic.ValidationError as exc:
        problem = exc.errors()[0]
        field = ".".join(str(step) for step in problem["loc"]) or None
        raise ConfigurationError(
            _describe(problem), path=str(path), line=line, field=field
        ) from None


def _check_unique(
    path: Path,
    line: int,
    key: Sequence[str],
    value: Any,
    seen: dict[tuple[Any, ...], int],
) -> None:
    values = tuple(getattr(value, name) for name in key)
    if values in seen:
        raise ConfigurationError(
            f"duplicate {'/'.join(key)} {'/'.join(map(str, values))}; first on line {seen[values]}",
            path=str(path),
            line=line,
            field=key[-1],
        )
    seen[values] = line


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise ConfigurationError("file not found", path=str(path)) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigurationError(f"cannot read file: {exc}", path=str(path)) from None
