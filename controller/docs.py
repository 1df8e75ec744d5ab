"""/docs and /redoc served from vendored Swagger UI and ReDoc assets, so they work with no network."""

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse

STATIC_PREFIX = "/static"
SWAGGER_JS = f"{STATIC_PREFIX}/vendor/swagger-ui/swagger-ui-bundle.js"
SWAGGER_CSS = f"{STATIC_PREFIX}/vendor/swagger-ui/swagger-ui.css"
FAVICON = f"{STATIC_PREFIX}/vendor/swagger-ui/favicon-32x32.png"
REDOC_JS = f"{STATIC_PREFIX}/vendor/redoc/redoc.standalone.js"
OAUTH2_REDIRECT = "/docs/oauth2-redirect"


def install_offline_docs(app: FastAPI) -> None:
    """Add /docs, its OAuth2 redirect and /redoc; the app must be built with docs_url=None, redoc_url=None."""

    def openapi_url(request: Request) -> str:
        """The OpenAPI document's URL under the app's root path (behind a proxy prefix too)."""
        return request.scope.get("root_path", "").rstrip("/") + (app.openapi_url or "/openapi.json")

    @app.get("/docs", include_in_schema=False)
    def swagger_ui(request: Request) -> HTMLResponse:
        """Swagger UI from the app's own static files."""
        root = request.scope.get("root_path", "").rstrip("/")
        return get_swagger_ui_html(
            openapi_url=openapi_url(request),
            title=f"{app.title} - Swagger UI",
            swagger_js_url=root + SWAGGER_JS,
            swagger_css_url=root + SWAGGER_CSS,
            swagger_favicon_url=root + FAVICON,
            oauth2_redirect_url=root + OAUTH2_REDIRECT,
            # validatorUrl null: Swagger UI would otherwise send the spec to an online validator
            swagger_ui_parameters={"validatorUrl": None, "persistAuthorization": True},
        )

    @app.get(OAUTH2_REDIRECT, include_in_schema=False)
    def swagger_ui_redirect() -> HTMLResponse:
        """Swagger UI's OAuth2 redirect page."""
        return get_swagger_ui_oauth2_redirect_html()

    @app.get("/redoc", include_in_schema=False)
    def redoc(request: Request) -> HTMLResponse:
        """ReDoc from the app's own static files, with no web fonts."""
        root = request.scope.get("root_path", "").rstrip("/")
        return get_redoc_html(
            openapi_url=openapi_url(request),
            title=f"{app.title} - ReDoc",
            redoc_js_url=root + REDOC_JS,
            redoc_favicon_url=root + FAVICON,
            with_google_fonts=False,
        )
