"""An ASGI middleware that makes every response speak root-relative paths (entity/paths.py) for this app's roots."""

from starlette.types import ASGIApp, Receive, Scope, Send

from entity.paths import Roots, client_roots
from util.settings import Settings


def roots_of(settings: Settings) -> Roots:
    """The settings' roots with their roles, the innermost first (a root may lie inside another)."""
    roles = [
        (settings.data_dir, "data"),
        (settings.model_dir, "model"),
        *((root, f"allowed_roots[{i}]") for i, root in enumerate(settings.paths.allowed_roots)),
    ]
    resolved = [(root.resolve(), role) for root, role in roles]
    return tuple(sorted(resolved, key=lambda item: len(item[0].parts), reverse=True))


class ClientPaths:
    """Bind the roots for the duration of each request, so response models show paths relative to them."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        """Wrap `app` with the roots of `settings`."""
        self.app = app
        self.roots = roots_of(settings)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Run the request with the roots bound."""
        with client_roots(self.roots):
            await self.app(scope, receive, send)
