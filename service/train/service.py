"""The training service: checks a train request up front, then queues it as a task."""

from pathlib import Path
from typing import Any

from entity.task import TaskKind, TaskRow
from entity.train import TrainRequest
from service import models
from service.data import load_conversations, load_preferences
from service.jobs import JobRunner
from service.train import attention
from service.train.strategies import STRATEGIES
from util.errors import ConflictError, InvalidInputError, NotFoundError
from util.paths import resolve_client_path
from util.settings import Settings


def task_request(
    req: TrainRequest,
    dataset: Path,
    eval_dataset: Path | None,
    model_path: Path,
    output_dir: Path,
    num_processes: int = 1,
    distributed: str = "ddp",
) -> dict[str, Any]:
    """The stored request of a train task: what the client asked, plus what it resolved to."""
    return {
        "train": req.model_dump(),
        "resolved": {
            "dataset_path": str(dataset),
            "eval_dataset_path": str(eval_dataset) if eval_dataset else None,
            "model_path": str(model_path),
            "output_dir": str(output_dir),
            "num_processes": num_processes,
            "distributed": distributed,
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
        path = resolve_client_path(raw, self.settings.data_dir, self.settings.roots)
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

    def _output_dir(self, raw: str | None, task_id: str, overwrite: bool) -> Path:
        """Resolve the output folder and refuse one that is busy or (without overwrite) not empty."""
        if raw is None:
            path = self.settings.model_dir / "outputs" / task_id
        else:
            path = resolve_client_path(raw, self.settings.model_dir, self.settings.roots)
        if path.exists() and not path.is_dir():
            raise ConflictError(f"output_dir '{path}' is a file.", details={"output_dir": str(path)})
        busy = self.runner.store.active_with_output(str(path))
        if busy:
            raise ConflictError(
                f"Task {busy[0].id} is already writing to '{path}'.",
                details={"output_dir": str(path), "task_id": busy[0].id},
            )
        if path.is_dir() and any(path.iterdir()) and not overwrite:
            raise ConflictError(
                f"output_dir '{path}' is not empty; choose another or pass \"overwrite\": true.",
                details={"output_dir": str(path)},
            )
        return path

    def _processes(self, req: TrainRequest) -> int:
        """How many processes the task runs: one per GPU (all visible by default), or as asked on CPU."""
        gpus = models.gpu_count()
        wanted = req.config.num_gpus or self.settings.train.num_gpus or max(1, gpus)
        if gpus and wanted > gpus:
            raise InvalidInputError(
                f"num_gpus {wanted} is more than the {gpus} GPU(s) this server sees.",
                details={"num_gpus": wanted, "visible_gpus": gpus},
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
        dataset = self._dataset(req.dataset_path, "dataset_path", strategy.data_kind)
        eval_dataset = None
        if req.config.eval_dataset_path:
            eval_dataset = self._dataset(req.config.eval_dataset_path, "eval_dataset_path", strategy.data_kind)
        model_path = models.resolve_model_ref(req.config.model_path, self.settings, self.runner.store)
        task_id = self.runner.store.new_id()
        output_dir = self._output_dir(req.output_dir, task_id, req.overwrite)
        distributed = req.config.distributed or self.settings.train.distributed
        processes = self._processes(req)
        if distributed == "fsdp" and processes > 1 and not models.gpu_count():
            raise InvalidInputError('FSDP needs CUDA GPUs; on CPU use "distributed": "ddp".')
        request = task_request(req, dataset, eval_dataset, model_path, output_dir, processes, distributed)
        request.update(extra or {})
        return self.runner.submit(TaskKind.train, request, str(output_dir), task_id)
