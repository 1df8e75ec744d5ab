"""Dependency aliases handing the lifespan's shared objects to routes."""

from typing import Annotated

from fastapi import Depends, Request

from service.data import DataService
from service.eval import EvalService
from service.export import ExportService
from service.fine_tuning.files import FileService
from service.fine_tuning.jobs import FineTuningService
from service.inference import InferenceService
from service.jobs import JobRunner
from service.outputs import OutputFileService
from service.runs import RunService
from service.tasks import TaskStore
from service.train.service import TrainService
from util.settings import Settings


def get_settings(request: Request) -> Settings:
    """The app's settings."""
    return request.app.state.settings


def get_store(request: Request) -> TaskStore:
    """The task store."""
    return request.app.state.store


def get_runner(request: Request) -> JobRunner:
    """The job runner."""
    return request.app.state.runner


def get_data_service(request: Request) -> DataService:
    """The data service."""
    return request.app.state.data_service


def get_train_service(request: Request) -> TrainService:
    """The training service."""
    return request.app.state.train_service


def get_inference_service(request: Request) -> InferenceService:
    """The inference service."""
    return request.app.state.inference_service


def get_export_service(request: Request) -> ExportService:
    """The export service."""
    return request.app.state.export_service


def get_eval_service(request: Request) -> EvalService:
    """The evaluation service."""
    return request.app.state.eval_service


def get_run_service(request: Request) -> RunService:
    """The training-run service."""
    return request.app.state.run_service


def get_file_service(request: Request) -> FileService:
    """The OpenAI file store."""
    return request.app.state.file_service


def get_fine_tuning_service(request: Request) -> FineTuningService:
    """The OpenAI fine-tuning job service."""
    return request.app.state.fine_tuning_service


SettingsDep = Annotated[Settings, Depends(get_settings)]
StoreDep = Annotated[TaskStore, Depends(get_store)]
RunnerDep = Annotated[JobRunner, Depends(get_runner)]
DataServiceDep = Annotated[DataService, Depends(get_data_service)]
TrainServiceDep = Annotated[TrainService, Depends(get_train_service)]
InferenceServiceDep = Annotated[InferenceService, Depends(get_inference_service)]
ExportServiceDep = Annotated[ExportService, Depends(get_export_service)]
EvalServiceDep = Annotated[EvalService, Depends(get_eval_service)]
RunServiceDep = Annotated[RunService, Depends(get_run_service)]
FileServiceDep = Annotated[FileService, Depends(get_file_service)]
FineTuningServiceDep = Annotated[FineTuningService, Depends(get_fine_tuning_service)]


def get_output_file_service(request: Request) -> OutputFileService:
    """The task output-file service."""
    return request.app.state.output_file_service


OutputFileServiceDep = Annotated[OutputFileService, Depends(get_output_file_service)]
