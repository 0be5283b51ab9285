"""Site data files (JSONL or CSV): reading and validation with file/line/field errors."""

from __future__ import annotations

import csv
import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

from fedtune.config import RunSettings, resolve_path
from fedtune.errors import DataError

SUPPORTED_SUFFIXES = (".jsonl", ".csv")


@dataclass(frozen=True)
class ClassificationExample:
    """One labelled text; `label` indexes the coordinator's label set."""

    text: str
    label: int


@dataclass(frozen=True)
class CompletionExample:
    """One prompt/completion pair for causal-LM fine-tuning, with where it was read
    (for errors found later, when it is tokenised)."""

    prompt: str
    completion: str
    source: str = field(default="", compare=False)
    line: int = field(default=0, compare=False)


Example = ClassificationExample | CompletionExample


def read_rows(path: str | Path) -> Iterator[tuple[int, dict[str, object]]]:
    """Yield (line number, row) from a JSONL or CSV file, rejecting malformed lines."""
    path = Path(path)
    if path.suffix.lower() not in SUPPORTED_SUFFIXES:
        raise DataError(path, f"unsupported file type '{path.suffix}'; use .jsonl or .csv")
    if not path.exists():
        raise DataError(path, "file not found")
    if not path.is_file():
        raise DataError(path, "not a regular file")
    try:
        with path.open(encoding="utf-8", newline="") as handle:
            if path.suffix.lower() == ".jsonl":
                yield from _jsonl_rows(path, handle)
            else:
                yield from _csv_rows(path, handle)
    except UnicodeDecodeError as err:
        raise DataError(path, f"not valid UTF-8 (byte {err.start})") from None


def _jsonl_rows(path: Path, handle: Iterator[str]) -> Iterator[tuple[int, dict[str, object]]]:
    for line_no, line in enumerate(handle, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(path, f"bad JSON ({err.msg} at column {err.colno})", line=line_no) from None
        if not isinstance(row, dict):
            raise DataError(path, f"expected a JSON object, got {type(row).__name__}", line=line_no)
        yield line_no, row


def _csv_rows(path: Path, handle: Iterator[str]) -> Iterator[tuple[int, dict[str, object]]]:
    reader = csv.DictReader(handle)
    try:
        for row in reader:
            if None in row:
                raise DataError(path, "more cells than header columns", line=reader.line_num)
            yield reader.line_num, dict(row)
    except csv.Error as err:
        raise DataError(path, f"bad CSV ({err})", line=reader.line_num) from None


def _text(path: Path, line: int, row: dict[str, object], field: str) -> str:
    if field not in row or row[field] is None:
        raise DataError(path, "missing", line=line, field=field)
    value = row[field]
    if not isinstance(value, str):
        raise DataError(path, f"expected a string, got {type(value).__name__}", line=line, field=field)
    if not value.strip():
        raise DataError(path, "empty text", line=line, field=field)
    return value


def load_classification(
    path: str | Path, text_field: str, label_field: str, labels: Sequence[str] | None
) -> list[ClassificationExample]:
    """Read labelled texts; a label outside the coordinator's set is an error.
    `labels=None` accepts any label (a site checking its file before it knows the set)."""
    path = Path(path)
    open_set = labels is None
    index = {name: i for i, name in enumerate(labels or [])}
    examples: list[ClassificationExample] = []
    for line, row in read_rows(path):
        text = _text(path, line, row, text_field)
        if label_field not in row or row[label_field] is None:
            raise DataError(path, "missing", line=line, field=label_field)
        raw = row[label_field]
        if isinstance(raw, bool) or not isinstance(raw, (str, int)):
            raise DataError(path, f"expected a string label, got {type(raw).__name__}", line=line, field=label_field)
        name = str(raw).strip()
        if open_set and name and name not in index:
            index[name] = len(index)
        if name not in index:
            raise DataError(
                path,
                f"label {name!r} is not in the coordinator's label set ({len(index)} labels)",
                line=line,
                field=label_field,
            )
        examples.append(ClassificationExample(text=text, label=index[name]))
    if not examples:
        raise DataError(path, "no examples (the file is empty)")
    return examples


def load_completions(path: str | Path, prompt_field: str, completion_field: str) -> list[CompletionExample]:
    """Read prompt/completion pairs for causal-LM fine-tuning."""
    path = Path(path)
    examples = [
        CompletionExample(
            prompt=_text(path, line, row, prompt_field),
            completion=_text(path, line, row, completion_field),
            source=str(path),
            line=line,
        )
        for line, row in read_rows(path)
    ]
    if not examples:
        raise DataError(path, "no examples (the file is empty)")
    return examples


def load_examples(path: str, settings: RunSettings, labels: Sequence[str]) -> list[Example]:
    """Read and validate one data file for the run's task."""
    resolved = str(resolve_path(path))
    return list(
        _cached_examples(
            resolved,
            settings.task,
            settings.text_field,
            settings.label_field,
            settings.prompt_field,
            settings.completion_field,
            tuple(labels),
        )
    )


@functools.lru_cache(maxsize=4)
def _cached_examples(
    path: str,
    task: str,
    text_field: str,
    label_field: str,
    prompt_field: str,
    completion_field: str,
    labels: tuple[str, ...],
) -> tuple[Example, ...]:
    if task == "seq-cls":
        return tuple(load_classification(path, text_field, label_field, labels))
    return tuple(load_completions(path, prompt_field, completion_field))
