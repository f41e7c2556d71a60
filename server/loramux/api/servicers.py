"""The two loramux services. No torch here: everything goes through the engine."""

from __future__ import annotations

import asyncio
from pathlib import Path

from loramux.api.convert import (
    FINISH,
    adapter_info,
    logprobs_pb,
    messages_from_pb,
    params_from_pb,
    stream_from_event,
)
from loramux.api.interceptor import check_parsed
from loramux.engine.engine import Engine
from loramux.engine.request import Request
from loramux.engine.uploads import Upload
from loramux.errors import InvalidArgument
from loramux.pb.loramux.v1 import loramux_pb2 as pb
from loramux.pb.loramux.v1 import loramux_pb2_grpc as pb_grpc


class GenerationServicer(pb_grpc.GenerationServicer):
    """Turns Generate calls into engine requests and engine events into responses; the HTTP
    front door submits through it too (`submit`), so both validate alike."""

    def __init__(self, engine: Engine, default_max_new: int, max_new_limit: int) -> None:
        self.engine = engine
        self.default_max_new = default_max_new
        self.max_new_limit = max_new_limit

    async def submit(self, request: pb.GenerateRequest, timeout: float | None) -> Request:
        """Validate a request and queue it; raises the error its caller hears."""
        messages = messages_from_pb(request)
        params = params_from_pb(request, self.default_max_new, self.max_new_limit)
        grammar = await self.engine.compile(params.constraint) if params.constraint is not None else None
        return self.engine.submit(request.adapter_id, request.prompt, params, request.request_id,
                                  timeout, messages=messages, grammar=grammar)

    async def Generate(self, request, context):
        req = await self.submit(request, context.time_remaining())
        done = await self.engine.complete(req)
        return pb.GenerateResponse(
            text=done.text, token_ids=done.token_ids, finish_reason=FINISH[done.finish],
            prompt_tokens=len(req.prompt_ids), generated_tokens=len(done.token_ids), adapter_id=request.adapter_id,
            cached_prompt_tokens=req.cached_tokens, logprobs=logprobs_pb(done.logprobs),
        )

    async def GenerateStream(self, request, context):
        async for event in self.engine.events(await self.submit(request, context.time_remaining())):
            yield stream_from_event(event)


class AdapterRegistryServicer(pb_grpc.AdapterRegistryServicer):
    """Register, unregister and list adapters; file checks run off the event loop."""

    def __init__(self, engine: Engine, adapter_dir: Path, max_upload_bytes: int, adopt) -> None:
        self.engine = engine
        self.adapter_dir = adapter_dir
        self.max_upload_bytes = max_upload_bytes
        self.adopt = adopt  # registers a folder placed in adapter_dir (AdapterDirWatcher.adopt)

    async def RegisterAdapter(self, request, context):
        if not request.adapter_id or not request.path:
            raise InvalidArgument("adapter_id and path are both required")
        record = await asyncio.to_thread(self.engine.register, request.adapter_id, request.path)
        return adapter_info(record)

    async def UnregisterAdapter(self, request, context):
        record = await asyncio.to_thread(self.engine.unregister, request.adapter_id)
        return pb.UnregisterAdapterResponse(adapter_id=record.adapter_id)

    async def UploadAdapter(self, request_iterator, context):
        upload = None
        try:
            async for message in request_iterator:
                check_parsed(message)
                if upload is None:
                    if message.WhichOneof("part") != "header":
                        raise InvalidArgument("the first message of an upload must be its header")
                    h = message.header
                    upload = await asyncio.to_thread(Upload, self.adapter_dir, h.adapter_id, h.total_bytes,
                                                     h.sha256, self.max_upload_bytes)
                elif message.WhichOneof("part") == "chunk":
                    await asyncio.to_thread(upload.write, message.chunk.file_name, message.chunk.data)
                else:
                    raise InvalidArgument("only chunks may follow the header")
            if upload is None:
                raise InvalidArgument("empty upload: send a header and chunks")
            record = await asyncio.to_thread(upload.finish, self.adopt)
        except BaseException:
            if upload is not None:
                await asyncio.to_thread(upload.abort)
            raise
        return adapter_info(record)

    async def ListAdapters(self, request, context):
        return pb.ListAdaptersResponse(adapters=[adapter_info(r) for r in self.engine.store.list()])
