"""The OpenAI-compatible HTTP front door: FastAPI routes over the same engine as gRPC.

Requests are submitted through the gRPC servicer's `submit` (same validation, same
messages); errors are answered in OpenAI's JSON error shape with the HTTP status that
matches their gRPC status. No torch here.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi.sse import EventSourceResponse, format_sse_event
from starlette.exceptions import HTTPException

from loramux.api import openai_compat as oa
from loramux.api.auth import TOKEN_NEEDED, authorized
from loramux.api.interceptor import status_of
from loramux.api.servicers import GenerationServicer
from loramux.engine.engine import Engine
from loramux.engine.request import Event
from loramux.errors import Cancelled, InvalidArgument, LoramuxError, Unauthenticated

log = logging.getLogger(__name__)

HTTP_STATUS = {"INVALID_ARGUMENT": 400, "FAILED_PRECONDITION": 400, "UNAUTHENTICATED": 401,
               "PERMISSION_DENIED": 403, "NOT_FOUND": 404, "ALREADY_EXISTS": 409, "RESOURCE_EXHAUSTED": 429,
               "CANCELLED": 499, "INTERNAL": 500, "UNAVAILABLE": 503, "DEADLINE_EXCEEDED": 504}
ERROR_TYPE = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
              404: "not_found_error", 409: "conflict_error", 429: "rate_limit_error", 503: "service_unavailable"}
FRONTEND = "http"  # the `frontend` label of loramux_requests_total


def error_response(exc: BaseException) -> tuple[str, JSONResponse]:
    """(gRPC status name, OpenAI-shaped error response) for an exception."""
    code, message = status_of(exc)
    if code.name == "INTERNAL" and not isinstance(exc, LoramuxError):
        log.error("HTTP request failed", exc_info=exc)
    status = HTTP_STATUS.get(code.name, 500)
    return code.name, JSONResponse(error_body(message, status, code.name), status_code=status)


def error_body(message: str, status: int, code: str) -> dict:
    return {"error": {"message": message, "type": ERROR_TYPE.get(status, "server_error"), "param": None,
                      "code": code}}


def sse(body: dict | str) -> bytes:
    """One server-sent event (fastapi's framing); `data: [DONE]` ends an OpenAI stream."""
    return format_sse_event(data_str=body if isinstance(body, str) else json.dumps(body))


class OpenAIRoutes:
    """Owns the HTTP routes: generation, models, health, and the admin adapter routes."""

    def __init__(self, generation: GenerationServicer, engine: Engine, metrics, model_name: str,
                 admin_token: str | None, created: int) -> None:
        self.generation, self.engine, self.metrics = generation, engine, metrics
        self.model_name, self.created = model_name, created
        self.admin_token = admin_token

    def app(self) -> FastAPI:
        app = FastAPI(title="loramux", docs_url=None, redoc_url=None, openapi_url=None)
        app.post("/v1/chat/completions")(self.chat)
        app.post("/v1/completions")(self.completions)
        app.get("/v1/models")(self.models)
        app.get("/health")(self.health)
        app.post("/v1/load_lora_adapter")(self.load_adapter)
        app.post("/v1/unload_lora_adapter")(self.unload_adapter)
        app.exception_handler(HTTPException)(self._http_error)
        return app

    async def _http_error(self, request: Request, exc: HTTPException) -> JSONResponse:
        """Starlette's own errors (unknown route, wrong method) in OpenAI's shape too."""
        return JSONResponse(error_body(str(exc.detail), exc.status_code, "HTTP_ERROR"), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    # --- generation ------------------------------------------------------------------
    async def chat(self, request: Request):
        return await self._generate(request, oa.ChatRequest)

    async def completions(self, request: Request):
        return await self._generate(request, oa.CompletionRequest)

    async def _generate(self, request: Request, kind: type[oa.OpenAIRequest]):
        try:
            body = oa.parse(kind, await _json(request))
            wire = body.to_pb("" if body.model == self.model_name else body.model)
            req = await self.generation.submit(wire, None)
            answer = oa.Answer(kind is oa.ChatRequest, body.model, wire.params.HasField("top_logprobs"))
            if body.stream:
                return await self._start_stream(request, body, answer, req)
            done = await _unless_disconnected(request, self.engine.complete(req))
        except Exception as exc:
            status, response = error_response(exc)
            self._count(status)
            return response
        self._count("OK")
        return answer.full(done.text, done.finish, done.logprobs, len(req.prompt_ids), len(done.token_ids),
                           req.cached_tokens)

    async def _start_stream(self, request: Request, body: oa.OpenAIRequest, answer: oa.Answer,
                            req) -> EventSourceResponse:
        """The first event is awaited before the response starts, so that a request that fails
        before its first token (its adapter does not load, ...) keeps its HTTP status."""
        events = self.engine.events(req)
        first = await _unless_disconnected(request, anext(events))
        usage = body.stream_options is not None and body.stream_options.include_usage
        return EventSourceResponse(self._stream(answer, req, first, events, usage),
                                   headers={"Cache-Control": "no-cache"})

    async def _stream(self, answer: oa.Answer, req, first: Event, events: AsyncIterator[Event],
                      usage: bool) -> AsyncIterator[bytes]:
        """The chunks of one answer. A client that goes away cancels this generator, which
        closes `events`: the engine cancels the request and frees its row."""
        status = "CANCELLED"
        try:
            event, n = first, 0
            while True:
                n += len(event.token_ids)
                yield sse(answer.chunk(event.text, event.finish, list(event.logprobs), first=event is first))
                if event.finish is not None:
                    break
                event = await anext(events)
            if usage:
                yield sse(answer.usage_chunk(len(req.prompt_ids), n, req.cached_tokens))
            yield sse("[DONE]")
            status = "OK"
        except Exception as exc:  # after the headers: the error travels as an event, as vLLM sends it
            status, response = error_response(exc)
            yield sse(json.loads(response.body))
            yield sse("[DONE]")
        finally:
            await events.aclose()
            self._count(status)

    def _count(self, status: str) -> None:
        self.metrics.requests.labels(status=status, frontend=FRONTEND).inc()

    # --- models and health -----------------------------------------------------------
    async def models(self) -> dict:
        cards = [oa.model_card(self.model_name, self.created)]
        cards += [oa.model_card(r.adapter_id, self.created, parent=self.model_name, root=str(r.path))
                  for r in self.engine.store.list()]
        return {"object": "list", "data": cards}

    async def health(self) -> JSONResponse:
        """200 while serving; 503 once draining, so that load balancers stop sending."""
        if self.engine.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        return JSONResponse({"status": "ok"})

    # --- adapter registry (admin token) ----------------------------------------------
    async def load_adapter(self, request: Request):
        """vLLM's route: {"lora_name": id, "lora_path": folder}."""
        return await self._admin(request, lambda b: self.engine.register(_field(b, "lora_name"),
                                                                         _field(b, "lora_path")))

    async def unload_adapter(self, request: Request):
        return await self._admin(request, lambda b: self.engine.unregister(_field(b, "lora_name")))

    async def _admin(self, request: Request, change):
        try:
            if self.admin_token and not authorized(request.headers.get("authorization", ""), self.admin_token):
                raise Unauthenticated(TOKEN_NEEDED)
            record = await asyncio.to_thread(change, await _json(request))
        except Exception as exc:
            return error_response(exc)[1]
        return oa.model_card(record.adapter_id, self.created, parent=self.model_name, root=str(record.path))


async def _unless_disconnected(request: Request, work):
    """`work`'s result; if the client goes away first, `work` is cancelled (and with it the
    engine request: its row is freed) and Cancelled raised (starlette cancels only a
    response that has started streaming)."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnect(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not task.done():
            task.cancel()  # the client went away (or this handler was cancelled): so does the request
    if not task.done():
        raise Cancelled("the client disconnected")
    return task.result()


async def _disconnect(request: Request) -> None:
    """Returns when the client disconnects (the body is read: receive() waits for that)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _json(request: Request):
    try:
        return await request.json()
    except ValueError:
        raise InvalidArgument("the request body is not JSON") from None


def _field(body, name: str) -> str:
    value = body.get(name) if isinstance(body, dict) else None
    if not isinstance(value, str) or not value:
        raise InvalidArgument(f"{name} is required")
    return value
