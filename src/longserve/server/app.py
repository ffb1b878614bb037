"""`create_app` and the server state, under their historical import path.

The app is split along vLLM's lines: `protocol` (request/response models), `serving_engine` (state shared
by the endpoints), `serving` (per-endpoint response formats, SSE), `api_server` (app factory, routes,
auth, startup).
"""

from longserve.server.api_server import create_app
from longserve.server.serving_engine import PreparedPrompt, ServerState

__all__ = ["PreparedPrompt", "ServerState", "create_app"]
