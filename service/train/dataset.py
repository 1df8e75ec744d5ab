"""Training data: merge the request's files, tokenise, truncate or skip over-long records, and count it all."""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from service import models
from service.data import RecordInvalid, length_stats, normalize_record, read_records


@dataclass
class DataStats:
    """What happened to each record on its way into training."""

    files: list[str] = field(default_factory=list)
    records: int = 0  # every record read, valid or not
    processed: int = 0  # records that made it into the training set
    truncated: int = 0  # of those, how many were cut to max_length
    skipped: int = 0  # over-long records left out because truncate is false
    failed: int = 0  # records that were not valid conversations or could not be tokenised
    max_length: int = 0
    truncate: bool = True
    lengths_before: list[int] = field(default_factory=list)
    lengths_after: list[int] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready summary: the counts and min/mean/median/p95/max lengths before and after truncation."""

        def summary(values: list[int]) -> dict[str, Any] | None:
            stats = length_stats(values, self.max_length)
            return None if stats is None else stats.model_dump(include={"min", "mean", "median", "p95", "max"})

        return {
            "files": self.files,
            "records": self.records,
            "processed": self.processed,
            "truncated": self.truncated,
            "skipped": self.skipped,
            "failed": self.failed,
            "max_length": self.max_length,
            "truncate": self.truncate,
            "tokens": sum(self.lengths_after),
            "length_before_truncation": summary(self.lengths_before),
            "length_after_truncation": summary(self.lengths_after),
        }


def tokenized_rows(
    paths: list[Path], tokenizer: Any, max_length: int, truncate: bool
) -> tuple[list[dict[str, list[int]]], DataStats]:
    """Rows of input_ids and assistant_masks from the files in order, cut (or skipped) at max_length, with stats."""
    stats = DataStats(files=[str(p) for p in paths], max_length=max_length, truncate=truncate)
    rows: list[dict[str, list[int]]] = []
    for path in paths:
        for rec in read_records(path):
            stats.records += 1
            try:
                if rec.error is not None:
                    raise RecordInvalid(rec.error)
                _, messages = normalize_record(rec.obj)
                row = models.tokenize_with_assistant_mask(tokenizer, messages)
            except (RecordInvalid, ValueError):
                stats.failed += 1
                continue
            length = len(row["input_ids"])
            stats.lengths_before.append(length)
            if length > max_length:
                if not truncate:
                    stats.skipped += 1
                    continue
                stats.truncated += 1
                row = {key: values[:max_length] for key, values in row.items()}
            stats.processed += 1
            stats.lengths_after.append(len(row["input_ids"]))
            rows.append(row)
    return rows, stats


def build_dataset(
    paths: list[Path], tokenizer: Any, assistant_only_loss: bool, max_length: int, truncate: bool = True
) -> tuple[Any, DataStats]:
    """A datasets.Dataset of the merged files (assistant_masks kept when the loss is on assistant tokens only)."""
    from datasets import Dataset

    rows, stats = tokenized_rows(paths, tokenizer, max_length, truncate)
    if not rows:
        why = f"all {stats.skipped} valid records are longer than max_length {max_length}" if stats.skipped else ""
        raise ValueError(f"{', '.join(stats.files)}: no usable training records. {why}".strip())
    if assistant_only_loss and not any(1 in row["assistant_masks"] for row in rows):
        # TRL would leave out every record (nothing to learn in it) and fail later with an empty sampler.
        raise ValueError(
            f"{', '.join(stats.files)}: no usable training records: cut to max_length {max_length}, no record keeps "
            "an assistant token (the part before each first answer is longer). Raise max_length, or train on every "
            "token (assistant_only_loss: false)."
        )
    if not assistant_only_loss:
        rows = [{"input_ids": r["input_ids"]} for r in rows]
    return Dataset.from_list(rows), stats
