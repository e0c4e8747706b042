"""The Rebond web application: the FHIR API and the health probe, over one store."""
from __future__ import annotations

import logging

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from rebond.fhir.api import FhirApi, error_response
from rebond.fhir.errors import FhirError
from rebond.security.accounts import Accounts
from rebond.store.base import Store, StoreError
from rebond.web.app import WebApp

log = logging.getLogger("rebond")


def create_app(store: Store, *, session_idle: float = 30 * 60, secure_cookies: bool = False) -> Starlette:
    api = FhirApi(store)
    web = WebApp(store, Accounts(store, idle=session_idle), secure_cookies=secure_cookies)

    async def healthz(request: Request) -> Response:
        try:
            await run_in_threadpool(store.ping)
        except StoreError as err:
            return JSONResponse({"status": "unavailable", "reason": str(err)}, status_code=503)
        except Exception:
            log.exception("health check failed")
            return JSONResponse({"status": "unavailable", "reason": "the store did not answer"}, status_code=503)
        return JSONResponse({"status": "ok", "site_id": store.site_id})

    async def unrouted(request: Request, exc: Exception) -> Response:
        status = exc.status_code if isinstance(exc, HTTPException) else 500
        message = exc.detail if isinstance(exc, HTTPException) else "internal error"
        if request.url.path.startswith("/fhir"):
            return error_response(FhirError(status, message, code="not-found" if status == 404 else "exception"))
        return web.error_page(request, status, web.language_of(request).gettext("This page does not exist."))

    app = Starlette(routes=[Route("/healthz", healthz, methods=["GET"]), *api.routes(), *web.routes()],
                    exception_handlers={404: unrouted, 405: unrouted})
    app.state.store = store
    return app


def app_from_environment() -> Starlette:
    """The app for each worker process of `rebond serve --workers N` (settings come through the environment)."""
    import os

    from rebond.store import DEFAULT_DB, open_store

    store = open_store(os.environ.get("REBOND_DB", DEFAULT_DB), site_id=os.environ.get("REBOND_SITE_ID", "central"))
    return create_app(store, session_idle=float(os.environ.get("REBOND_SESSION_IDLE", 30 * 60)))
