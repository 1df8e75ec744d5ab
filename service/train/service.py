"""The training service: checks a train request up front, then queues it as a task."""

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from entity.task import TaskKind, TaskRow
from entity.train import TrainRequest
from service import models
from service.data import (
    Message,
    Preference,
    RecordInvalid,
    load_conversations,
    load_preferences,
    normalize_preference,
    normalize_record,
    read_records,
)
from service.jobs import JobRunner
from service.train import attention, tracking
from service.train.checkpoints import latest_checkpoint
from service.train.strategies import STRATEGIES
from util.errors import ConflictError, InvalidInputError, NotFoundError
from util.files import check_replaceable
from util.paths import resolve_in_roots, resolve_output
from util.settings import Settings

FIT_CHECK_SECONDS = 5.0  # how long a submit looks for a record that reaches training before it gives the benefit
FIT_CHECK_MAX_CHARS = 1_000_000  # a longer rendered record is not tokenised at submit (it proves nothing either way)


@dataclass(frozen=True)
class _FitCheck:
    """One set of files read at one max_length: the run's (or a stage's) training data, or the eval data."""

    field: str  # the request field that names the files
    setting: str  # the request field that sets max_length
    paths: tuple[Path, ...]
    max_length: int
    truncate: bool


def _common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading ids two id lists share."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _chat_cost(tokenizer: Any, messages: list[Message], truncate: bool) -> int | None:
    """What decides whether a chat record reaches training; None when it is too long to measure here.

    Truncating (the worker cuts each record to max_length, then TRL leaves out records with no trainable token):
    the index of the first assistant token, which must be below max_length. Not truncating (the worker leaves out
    longer records): the record's length, which must be at most max_length.
    """
    if len(models.render_chat(tokenizer, messages)) > FIT_CHECK_MAX_CHARS:
        return None
    row = models.tokenize_with_assistant_mask(tokenizer, messages)  # exactly as service.train.dataset does
    if not truncate:
        return len(row["input_ids"])
    return next((i for i, bit in enumerate(row["assistant_masks"]) if bit), len(row["assistant_masks"]))


def _preference_cost(tokenizer: Any, record: Preference) -> int | None:
    """The prompt tokens of a preference record as TRL's DPO counts them; None when too long to measure here.

    DPO leaves out a record whose prompt fills max_length: the prompt must be shorter than max_length.
    """
    prompt = models.render_chat(tokenizer, record["prompt"], add_generation_prompt=True)
    if len(prompt) > FIT_CHECK_MAX_CHARS:
        return None
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    return min(
        _common_prefix(prompt_ids, models.chat_token_ids(tokenizer, record["prompt"] + record[side]))
        for side in ("chosen", "rejected")
    )


def _search_fit(tokenizer: Any, kind: str, check: _FitCheck, deadline: float) -> tuple[int, int] | None:
    """None when a record of `check` reaches training (or that cannot be told in time); else (least cost, records).

    Records that are not valid (the worker leaves them out as failed) count neither way.
    """
    limit = check.max_length + 1 if kind == "chat" and not check.truncate else check.max_length
    shortest, measured = 0, 0
    for path in check.paths:
        for rec in read_records(path):
            if time.monotonic() > deadline:
                return None
            if rec.error is not None:
                continue
            try:
                if kind == "preference":
                    cost = _preference_cost(tokenizer, normalize_preference(rec.obj)[1])
                else:
                    cost = _chat_cost(tokenizer, normalize_record(rec.obj)[1], check.truncate)
            except (RecordInvalid, ValueError):
                continue
            if cost is None or cost < limit:
                return None
            shortest = cost if not measured else min(shortest, cost)
            measured += 1
    return (shortest, measured) if measured else None


def task_request(
    req: TrainRequest,
    dataset: Path | list[Path],
    eval_dataset: Path | None,
    model_path: Path,
    output_dir: Path,
    num_processes: int = 1,
    distributed: str = "ddp",
    **extra: Any,
) -> dict[str, Any]:
    """The stored request of a train task: what the client asked, plus what it resolved to."""
    datasets = dataset if isinstance(dataset, list) else [dataset]
    return {
        "train": req.model_dump(),
        "resolved": {
            "dataset_path": str(datasets[0]),
            "dataset_paths": [str(p) for p in datasets],
            "eval_dataset_path": str(eval_dataset) if eval_dataset else None,
            "model_path": str(model_path),
            "output_dir": str(output_dir),
            "num_processes": num_processes,
            "distributed": distributed,
            **extra,
        },
    }


class TrainService:
    """Validates train requests against the sandbox and the store, and submits them to the runner."""

    def __init__(self, settings: Settings, runner: JobRunner) -> None:
        """Bind to settings and the job runner."""
        self.settings = settings
        self.runner = runner

    def _dataset(self, raw: str, field: str, kind: str = "chat") -> Path:
        """Resolve a dataset path and require at least one valid record of the strategy's kind in it."""
        path = resolve_in_roots(raw, self.settings.data_dir, self.settings)
        if not path.is_file():
            raise NotFoundError(f"{field} '{raw}' does not exist.", details={field: raw})
        found = load_preferences(path) if kind == "preference" else load_conversations(path)
        if not found:
            what = "preference records (prompt/chosen/rejected)" if kind == "preference" else "conversations"
            raise InvalidInputError(
                f"{field} '{raw}' has no valid {what}; run /api/data/validate to see why.",
                details={field: raw},
            )
        return path

    def _datasets(self, raw: str | list[str], field: str, kind: str = "chat") -> list[Path]:
        """Resolve one or several dataset paths (each checked like a single one)."""
        paths = [raw] if isinstance(raw, str) else raw
        return [self._dataset(p, field, kind) for p in paths]

    def _fit_checks(
        self, req: TrainRequest, datasets: list[Path], stage_paths: list[list[Path] | None], eval_dataset: Path | None
    ) -> list[_FitCheck]:
        """The data/max_length combinations a run trains (and evaluates) on, each once."""
        base = req.config.max_length or self.settings.train.max_length
        setting = "config.max_length" if req.config.max_length else "config.max_length (default train.max_length)"
        checks = [_FitCheck("dataset_path", setting, tuple(datasets), base, req.config.truncate)]
        if req.stages:
            checks = []
            for i, (stage, own) in enumerate(zip(req.stages, stage_paths, strict=True)):
                checks.append(
                    _FitCheck(
                        f"stages.{i}.dataset_path" if own else "dataset_path",
                        f"stages.{i}.max_length" if stage.max_length else setting,
                        tuple(own or datasets),
                        stage.max_length or base,
                        req.config.truncate if stage.truncate is None else stage.truncate,
                    )
                )
        if eval_dataset is not None:  # every stage evaluates, cutting (never leaving out) records: the shortest counts
            shortest = min(checks, key=lambda c: c.max_length)
            checks.append(_FitCheck("eval_dataset_path", shortest.setting, (eval_dataset,), shortest.max_length, True))
        unique: dict[tuple[Any, ...], _FitCheck] = {}
        for check in checks:
            unique.setdefault((check.paths, check.max_length, check.truncate), check)
        return list(unique.values())

    def _check_fits(self, req: TrainRequest, kind: str, checks: list[_FitCheck], model_path: Path) -> None:
        """Refuse (422) data of which no record would reach training at its max_length.

        Records are tokenised as the worker does, in file order, and the search stops at the first record that fits,
        so a usable dataset costs one record. Within FIT_CHECK_SECONDS in all; data it cannot finish (time spent,
        a record too long to measure here) passes, and the worker reports it if it is unusable after all.
        """
        deadline = time.monotonic() + FIT_CHECK_SECONDS
        tokenizer = None
        for check in checks:
            if kind == "chat" and check.truncate and not req.config.assistant_only_loss:
                continue  # every record keeps its first max_length tokens, and each of them is trained on
            tokenizer = tokenizer or models.load_tokenizer(models.tokenizer_dir(model_path))
            found = _search_fit(tokenizer, kind, check, deadline)
            if found is not None:
                raise _no_fit_error(kind, check, *found, req.config.assistant_only_loss)

    def _resume(self, req: TrainRequest, output_dir: Path) -> str | None:
        """The checkpoint an explicit resume_from_checkpoint names (true: the newest one in output_dir)."""
        wanted = req.resume_from_checkpoint
        if wanted is None or wanted is False:
            return None
        if wanted is True:
            found = latest_checkpoint(output_dir) if output_dir.is_dir() else None
            if found is None:
                raise NotFoundError(
                    f"resume_from_checkpoint: output_dir '{output_dir}' holds no checkpoint to resume from.",
                    details={"resume_from_checkpoint": True, "output_dir": str(output_dir)},
                )
            return str(found)
        path = resolve_in_roots(wanted, self.settings.model_dir, self.settings)
        if not (path / "trainer_state.json").is_file():
            raise NotFoundError(
                f"resume_from_checkpoint '{wanted}' is not a checkpoint folder (no trainer_state.json).",
                details={"resume_from_checkpoint": wanted},
            )
        return str(path)

    def _output_dir(self, raw: str | None, task_id: str, overwrite: bool) -> Path:
        """Resolve the output folder; refuse a busy one, a foreign one, and (without overwrite) an earlier output."""
        name = raw or f"outputs/{task_id}"
        path = resolve_output(name, self.settings.model_dir, self.settings)
        if path.exists() and not path.is_dir():
            raise ConflictError(f"output_dir '{name}' is a file.", details={"output_dir": name})
        busy = self.runner.store.active_with_output(str(path))
        if busy:
            raise ConflictError(
                f"Task {busy[0].id} is already writing to '{name}'.",
                details={"output_dir": name, "task_id": busy[0].id},
            )
        if check_replaceable(path, TaskKind.train, name) and not overwrite:
            raise ConflictError(
                f"output_dir '{name}' is not empty; choose another or pass \"overwrite\": true.",
                details={"output_dir": name},
            )
        return path

    def _processes(self, req: TrainRequest) -> int:
        """How many processes the task runs: one per GPU (all of one node by default), or as asked on CPU."""
        gpus, cpu_processes, where = self.runner.room()  # this server, or the largest node of the Ray cluster
        wanted = req.config.num_gpus or self.settings.train.num_gpus or max(1, gpus)
        if gpus and wanted > gpus:
            raise InvalidInputError(
                f"num_gpus {wanted} is more than the {gpus} GPU(s) of {where}.",
                details={"num_gpus": wanted, "visible_gpus": gpus},
            )
        if not gpus and wanted > cpu_processes:  # on CPU each process is a rank: more ranks than cores only thrash
            raise InvalidInputError(
                f"num_gpus {wanted} asks for {wanted} CPU processes, but {where} has room for {cpu_processes}.",
                details={"num_gpus": wanted, "cpu_processes": cpu_processes},
            )
        return wanted

    def start(self, req: TrainRequest, extra: dict[str, Any] | None = None) -> TaskRow:
        """Check everything that can be checked now, then queue the training task (extra: more request keys)."""
        if req.strategy not in STRATEGIES:
            raise InvalidInputError(
                f"Unknown strategy '{req.strategy}'; choose one of {sorted(STRATEGIES)}.",
                details={"strategy": req.strategy},
            )
        if req.config.use_liger_kernel and not models.liger_available():
            raise InvalidInputError(
                "use_liger_kernel needs a CUDA GPU and the liger-kernel package; leave it unset to use it when present."
            )
        packing = req.config.packing
        packing_off = packing is False or (packing is None and self.settings.train.packing == "off")
        if req.config.attn_implementation == "varlen" and (packing_off or not attention.available()):
            raise InvalidInputError(
                'attn_implementation "varlen" needs packing and a CUDA GPU; leave it "auto" to use it where it can run.'
            )
        strategy = STRATEGIES[req.strategy]
        dpo_fields = [f for f in ("beta", "loss_type") if getattr(req.config, f) is not None]
        if dpo_fields and strategy.data_kind != "preference":
            raise InvalidInputError(
                f"{' and '.join(dpo_fields)} apply to the dpo strategy only.", details={"strategy": req.strategy}
            )
        if packing and not strategy.supports_packing:
            raise InvalidInputError(f"The {req.strategy} strategy does not pack examples; leave packing unset.")
        report_to = tracking.trackers(req.config.report_to, self.settings.train.report_to)
        tracking.check_installed(report_to)
        kind = strategy.data_kind
        datasets = self._datasets(req.dataset_path, "dataset_path", kind)
        stage_data = [
            [str(p) for p in self._datasets(stage.dataset_path, f"stages.{i}.dataset_path", kind)]
            for i, stage in enumerate(req.stages or [])
            if stage.dataset_path is not None
        ]
        eval_dataset = None
        if req.config.eval_dataset_path:
            eval_dataset = self._dataset(req.config.eval_dataset_path, "eval_dataset_path", strategy.data_kind)
        model_path = models.resolve_model_ref(req.config.model_path, self.settings, self.runner.store)
        own = iter(stage_data)
        stage_paths = [
            [Path(p) for p in next(own)] if stage.dataset_path is not None else None for stage in (req.stages or [])
        ]
        self._check_fits(req, kind, self._fit_checks(req, datasets, stage_paths, eval_dataset), model_path)
        task_id = self.runner.store.new_id()
        # Resuming into its own output_dir writes on top of the checkpoints there: no overwrite needed.
        output_dir = self._output_dir(req.output_dir, task_id, req.overwrite or req.resume_from_checkpoint is True)
        resume = self._resume(req, output_dir)
        distributed = req.config.distributed or self.settings.train.distributed
        processes = self._processes(req)
        if distributed == "fsdp" and processes > 1 and not models.gpu_count():
            raise InvalidInputError('FSDP needs CUDA GPUs; on CPU use "distributed": "ddp".')
        stages = [
            {"dataset_paths": stage_data.pop(0) if stage.dataset_path is not None else None}
            for stage in (req.stages or [])
        ]
        request = task_request(
            req, datasets, eval_dataset, model_path, output_dir, processes, distributed,
            report_to=report_to, resume_from_checkpoint=resume, resume_count=0, stages=stages or None,
        )  # fmt: skip
        request.update(extra or {})
        return self.runner.submit(TaskKind.train, request, str(output_dir), task_id)


def _no_fit_error(kind: str, check: _FitCheck, shortest: int, measured: int, assistant_only: bool) -> InvalidInputError:
    """The clear 422 for data of which no record would reach training."""
    n, where = check.max_length, check.setting
    if kind == "preference":
        why = (
            f"each record's prompt is {n} tokens or longer (the shortest is {shortest}), and DPO leaves out a record "
            f"whose prompt fills max_length. Raise {where}."
        )
    elif not check.truncate:
        why = (
            f"every record is longer than max_length {n} (the shortest is {shortest} tokens) and truncate is false, "
            f"so each is left out. Raise {where}, or let records be cut (truncate: true)."
        )
    else:
        why = (
            f"cut to max_length {n}, no record keeps an assistant token: the part before each record's first answer "
            f"(chat template, system prompt, question) is {shortest} tokens or more, and a record with nothing to "
            f"learn is left out. Raise {where}"
            + (", or train on every token (assistant_only_loss: false)." if assistant_only else ".")
        )
    return InvalidInputError(
        f"{check.field}: no record would reach training; {why}",
        details={"field": check.field, "max_length": n, "shortest": shortest, "records": measured},
    )
