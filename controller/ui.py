"""The web dashboard: server-rendered pages at /ui (open, so a user can enter a key) and the static assets."""

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

from util.settings import VERSION
from web import STATIC_DIR, TEMPLATES_DIR

router = APIRouter(include_in_schema=False)
templates = Jinja2Templates(directory=str(TEMPLATES_DIR))

PAGES = {
    "tasks": "Tasks",
    "datasets": "Datasets",
    "models": "Models",
    "evals": "Evaluations",
}


def _page(request: Request, name: str, **context: object) -> HTMLResponse:
    """Render one page with the navigation; the page's data is fetched by its script."""
    root = request.scope.get("root_path", "").rstrip("/")
    context = {"page": name, "pages": PAGES, "version": VERSION, "root": root, **context}
    return templates.TemplateResponse(request, f"{name}.html", context)


@router.get("/")
def root() -> RedirectResponse:
    """Send a browser to the dashboard."""
    return RedirectResponse("/ui", status_code=307)


@router.get("/ui")
def tasks_page(request: Request) -> HTMLResponse:
    """Tasks: a live table with status, progress, loss and ETA."""
    return _page(request, "tasks")


@router.get("/ui/tasks/{task_id}")
def task_page(request: Request, task_id: str) -> HTMLResponse:
    """One task: curves, request, logs, metrics and output files."""
    return _page(request, "task", task_id=task_id)


@router.get("/ui/datasets")
def datasets_page(request: Request) -> HTMLResponse:
    """Datasets: upload, validation report, preview, process/split."""
    return _page(request, "datasets")


@router.get("/ui/models")
def models_page(request: Request) -> HTMLResponse:
    """Models: base and trained models, and a streaming chat playground."""
    return _page(request, "models")


@router.get("/ui/evals")
def evals_page(request: Request) -> HTMLResponse:
    """Evaluations: metrics, per-example answers, base vs fine-tuned."""
    return _page(request, "evals")


def install(app: FastAPI) -> None:
    """Mount /static and the dashboard pages on an app."""
    app.mount("/static", StaticFiles(directory=str(STATIC_DIR)), name="static")
    app.include_router(router)
