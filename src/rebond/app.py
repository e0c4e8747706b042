"""The Rebond web application: the FHIR API and the health probe, over one store."""
from __future__ import annotations

import logging

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from rebond.fhir.api import FhirApi
from rebond.store.base import Store, StoreError

log = logging.getLogger("rebond")


def create_app(store: Store) -> Starlette:
    api = FhirApi(store)

    async def healthz(request: Request) -> Response:
        try:
            await run_in_threadpool(store.ping)
        except StoreError as err:
            return JSONResponse({"status": "unavailable", "reason": str(err)}, status_code=503)
        except Exception:
            log.exception("health check failed")
            return JSONResponse({"status": "unavailable", "reason": "the store did not answer"}, status_code=503)
        return JSONResponse({"status": "ok", "site_id": store.site_id})

    app = Starlette(routes=[Route("/healthz", healthz, methods=["GET"]), *api.routes()])
    app.state.store = store
    return app


def app_from_environment() -> Starlette:
    """The app for each worker process of `rebond serve --workers N` (settings come through the environment)."""
    import os

    from rebond.store import DEFAULT_DB, open_store

    store = open_store(os.environ.get("REBOND_DB", DEFAULT_DB), site_id=os.environ.get("REBOND_SITE_ID", "central"))
    return create_app(store)
