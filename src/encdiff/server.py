"""`encdiff serve`: one loaded generator behind an HTTP API and a web page (FastAPI + uvicorn, the `serve` extra).

Safe by construction: it binds loopback unless told otherwise; no request names a file or a model (the model is
the one the operator started it with, and the page's files are fixed names inside the package); a state-changing
request from another origin (an Origin or Host that is not the server's own, `Origin: null`, a cross-site fetch)
is refused with 403; GETs have no side effects. Every bad value is a 422 naming the field, and load beyond the
bounded queue is a 429 with Retry-After: a client never sees a 5xx for its own mistake.

One model worker thread runs the jobs in arrival order; a job whose client went away is cancelled at its next step.
"""


import asyncio
import base64
import dataclasses
import json
import queue
import secrets
import threading
import time
from dataclasses import dataclass
from importlib import resources
from typing import Any, Literal, Optional, Union

import torch

from .errors import EncdiffError
from .buckets import format_shape, parse_shape
from .images import png_bytes
from .pipeline import DECODERS, GUIDANCE_KINDS, Generator, samplers_for

LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")
SEED_MAX = 2**63 - 1  # torch.Generator.manual_seed takes 64-bit seeds; image i of a request uses seed + i


@dataclass(frozen=True)
class ServerLimits:
    max_images: int = 16  # images per request
    max_steps: int = 100  # sampler steps per request
    max_guidance: float = 20.0  # largest classifier-free guidance scale accepted
    queue_size: int = 4  # requests running or waiting; one more is answered 429
    max_body_bytes: int = 4096  # request body size (a valid request is under 200 bytes)
    preview_every: int = 2  # the stream sends a decoded preview every this many steps (and at the last)
    retry_after_s: int = 5  # the Retry-After of a 429


class Cancelled(Exception):
    """The client of a job went away: the worker stops it at the next sampler step."""


class Job:
    """One request's work; its events (progress, previews, result or error) reach the event loop thread-safely."""

    def __init__(self, loop: asyncio.AbstractEventLoop, seeds: list[int], labels: torch.Tensor | None, settings,
                 stream: bool, preview_every: int, size: tuple[int, int] | None = None):
        self.loop, self.seeds, self.labels, self.settings = loop, seeds, labels, settings
        self.size = size  # (height, width): one of the generator's trained sizes; None: its square
        self.stream, self.preview_every = stream, preview_every
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()

    def emit(self, kind: str, data: dict[str, Any]) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, data))

    def run(self, generator: Generator) -> None:
        steps = self.settings.steps

        def callback(i, sigma, x, denoised):
            if self.cancelled.is_set():
                raise Cancelled
            if self.stream:
                event: dict[str, Any] = {"step": i + 1, "of": steps}
                if (i + 1) % self.preview_every == 0 or i + 1 == steps:
                    # previews through the light decoder where there is one: they are glimpses, and frequent
                    fast = "light" if generator.light_decoder is not None else "full"
                    event["previews"] = [png_base64(image) for image in generator.decode(denoised, fast)]
                self.emit("progress", event)

        started = time.perf_counter()
        images = generator.images(self.seeds, self.labels, self.settings, size=self.size, callback=callback)
        names = generator.class_names
        self.emit("result", {
            "images": [{"seed": seed, "class": None if self.labels is None else
                        (names[int(label)] if names else int(label)), "png": png_base64(image)}
                       for seed, label, image in zip(self.seeds, self.labels if self.labels is not None else
                                                     [None] * len(self.seeds), images)],
            "sampling": dataclasses.asdict(self.settings), "seconds": round(time.perf_counter() - started, 3)})


class Worker:
    """The one thread that touches the model; at most `queue_size` jobs admitted (running or waiting)."""

    def __init__(self, generator: Generator, queue_size: int):
        self.generator = generator
        self.slots = threading.BoundedSemaphore(queue_size)
        self.jobs: queue.Queue[Job] = queue.Queue()
        self.pending = 0
        self.thread = threading.Thread(target=self.loop, name="encdiff-model-worker", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> bool:
        if not self.slots.acquire(blocking=False):
            return False
        self.pending += 1
        self.jobs.put(job)
        return True

    def loop(self) -> None:
        while True:
            job = self.jobs.get()
            try:
                if not job.cancelled.is_set():
                    job.run(self.generator)
            except Cancelled:
                pass
            except EncdiffError as e:
                job.emit("error", {"status": 422, "detail": str(e)})
            except Exception as e:  # a bug, not the client's mistake: report it as such, keep serving
                job.emit("error", {"status": 500, "detail": f"internal error: {type(e).__name__}"})
            finally:
                self.pending -= 1
                self.slots.release()


def png_base64(image: torch.Tensor) -> str:
    return base64.b64encode(png_bytes(image)).decode("ascii")


def static_file(name: str) -> bytes:
    return (resources.files("encdiff") / "web" / name).read_bytes()


def host_name(value: str) -> str:
    """'host:port' or '[v6]:port' -> the host name, lower case."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[: value.find("]") + 1] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


def create_app(generator: Generator, limits: ServerLimits = ServerLimits(), allowed_hosts: tuple[str, ...] = LOOPBACK):
    """The FastAPI application serving `generator`."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

    allowed = {h.lower() for h in allowed_hosts}
    worker = Worker(generator, limits.queue_size)
    defaults = generator.sampling
    sampler_names = samplers_for(generator.spec.kind)  # only those that fit the model: others are a 422

    class GenerateRequest(BaseModel):
        """What to generate; unset fields take the model's sampling defaults (GET /v1/model)."""

        model_config = ConfigDict(extra="forbid", populate_by_name=True)
        class_: Optional[Union[StrictStr, StrictInt]] = Field(
            None, alias="class", description="class name or index; none: a spread over the classes")
        num_images: StrictInt = Field(1, ge=1, le=limits.max_images, description="images to make")
        steps: Optional[StrictInt] = Field(None, ge=1, le=limits.max_steps, description="sampler steps")
        sampler: Optional[Literal[sampler_names]] = Field(None, description="sampler name")
        guidance: Optional[float] = Field(None, gt=0, le=limits.max_guidance, allow_inf_nan=False,
                                          description="classifier-free guidance scale; 1: none")
        guidance_interval: Optional[list[float]] = Field(
            None, min_length=2, max_length=2, description="[lo, hi]: guide only where lo < sigma <= hi (one network "
            "evaluation per step elsewhere); none: the model's default")
        guidance_kind: Optional[Literal[GUIDANCE_KINDS]] = Field(
            None, description="classifier-free, or auto (autoguidance by the model's guide); none: the model's default")
        decoder: Optional[Literal[DECODERS]] = Field(
            None, description="full, or light (the model's light decoder, faster); none: the model's default")
        size: Optional[StrictStr] = Field(None, max_length=16, description="WIDTHxHEIGHT, one of the model's sizes "
                                          "(GET /v1/model); none: its square")
        seed: Optional[StrictInt] = Field(None, ge=0, le=SEED_MAX - limits.max_images,
                                          description="seed of the first image (image i: seed + i); none: random")

    app = FastAPI(title="encdiff", description="Image generation with one encdiff generator.", version="1")

    def refuse(status: int, detail: Any, headers: dict[str, str] | None = None):
        return JSONResponse({"detail": detail}, status_code=status, headers=headers)

    def field_error(field: str, message: str):
        return refuse(422, [{"loc": ["body", field], "msg": message, "type": "value_error"}])

    @app.middleware("http")
    async def guard(request: Request, call_next):
        host = host_name(request.headers.get("host", ""))
        if host not in allowed:
            return refuse(403, f"Host {host!r} is not this server's (allowed: {', '.join(sorted(allowed))})")
        if request.method not in ("GET", "HEAD", "OPTIONS"):
            origin = request.headers.get("origin")
            if origin is not None:
                origin_host = host_name(origin.split("://", 1)[1]) if "://" in origin else None
                if origin_host is None or origin_host not in allowed:
                    return refuse(403, f"cross-origin request from Origin {origin!r} refused")
            if request.headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none"):
                return refuse(403, "cross-site request refused")
            length = request.headers.get("content-length")
            if length is None:
                return refuse(411, "a Content-Length is required")
            if not length.isdigit() or int(length) > limits.max_body_bytes:
                return refuse(413, f"request body over {limits.max_body_bytes} bytes")
            if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
                return refuse(415, "send the request body as application/json")
        response = await call_next(request)
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["X-Frame-Options"] = "DENY"
        response.headers["Content-Security-Policy"] = ("default-src 'self'; img-src 'self' data:; "
                                                       "frame-ancestors 'none'; base-uri 'none'; form-action 'none'")
        return response

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        # FastAPI's own 422, but without echoing the whole input back (it may be large or binary)
        errors = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
                  for e in exc.errors()]
        return refuse(422, errors)

    def prepare(body: GenerateRequest):
        """The job's seeds, labels and settings, or a 422 naming the field."""
        try:
            labels = generator.labels(body.num_images, body.class_)
        except EncdiffError as e:
            return field_error("class", str(e))
        try:
            settings = generator.settings(labels, sampler=body.sampler, steps=body.steps, guidance_scale=body.guidance,
                                          guidance_interval=body.guidance_interval, guidance_kind=body.guidance_kind,
                                          decoder=body.decoder)
        except EncdiffError as e:  # a sampler that does not fit; a student's built-in guidance; a bad interval
            message = str(e)
            field = ("sampler" if message.startswith("sampler") else
                     "guidance_interval" if "guidance_interval" in message else
                     "guidance_kind" if "guidance_kind =" in message else
                     "decoder" if "decoder" in message else "guidance")
            return field_error(field, message)
        try:
            size = generator.check_size(parse_shape(body.size, "size") if body.size is not None else None)
        except EncdiffError as e:
            return field_error("size", str(e))
        seed = body.seed if body.seed is not None else secrets.randbelow(2**31)
        return [seed + i for i in range(body.num_images)], labels, settings, size

    def admit(request: Request, body: GenerateRequest, stream: bool):
        prepared = prepare(body)
        if isinstance(prepared, JSONResponse):
            return prepared
        seeds, labels, settings, size = prepared
        job = Job(asyncio.get_running_loop(), seeds, labels, settings, stream, limits.preview_every, size)
        if not worker.submit(job):
            return refuse(429, f"busy: {limits.queue_size} requests are running or waiting; retry later",
                          {"Retry-After": str(limits.retry_after_s)})
        return job

    @app.get("/healthz", summary="liveness: always 200 while the server runs")
    def healthz():
        return {"status": "ok", "jobs": worker.pending}

    @app.get("/v1/model", summary="the model: classes, image size, sampling defaults, request limits")
    def model_info():
        return {"classes": generator.class_names or list(range(generator.num_classes)),
                "image_size": generator.image_size, "channels": generator.image_channels,
                "sizes": [format_shape(size) for size in generator.sizes],
                "latent": generator.downsample_factor > 1, "sampling": dataclasses.asdict(defaults),
                "sigma_max": generator.denoiser.sigma_max,
                "samplers": list(sampler_names), "limits": dataclasses.asdict(limits), "seed_max": SEED_MAX,
                "guidance_kinds": generator.guidance_kinds,
                "decoders": ["full"] + (["light"] if generator.light_decoder is not None else []),
                # a consistency student's guidance scale, fixed at distillation: the page then offers no guidance
                "guidance_built_in": (generator.distillation or {}).get("guidance_scale")
                if generator.spec.kind == "consistency" else None}

    @app.post("/v1/generate", summary="generate images: PNGs (base64) and the seed of each")
    async def generate(request: Request, body: GenerateRequest):
        job = admit(request, body, stream=False)
        if not isinstance(job, Job):
            return job
        while True:
            try:
                kind, data = await asyncio.wait_for(job.events.get(), timeout=0.25)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    job.cancelled.set()
                    return Response(status_code=499)
                continue
            if kind == "result":
                return data
            if kind == "error":
                return refuse(data["status"], data["detail"])

    @app.post("/v1/generate/stream", summary="the same, as server-sent events: progress {step, of, previews} "
              "every step (decoded previews every few steps), then the result")
    async def generate_stream(request: Request, body: GenerateRequest):
        job = admit(request, body, stream=True)
        if not isinstance(job, Job):
            return job

        async def events():
            try:
                while True:
                    kind, data = await job.events.get()
                    yield f"event: {kind}\ndata: {json.dumps(data)}\n\n"
                    if kind in ("result", "error"):
                        return
            finally:  # the client went away (or the stream ended): stop the job at its next step
                job.cancelled.set()

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    pages = {"/": ("index.html", "text/html; charset=utf-8"), "/app.js": ("app.js", "text/javascript"),
             "/style.css": ("style.css", "text/css")}
    for path, (name, media_type) in pages.items():
        content = static_file(name)  # read once, at start: a missing file fails here, not per request

        def page(content=content, media_type=media_type):
            return Response(content, media_type=media_type)

        app.add_api_route(path, page, methods=["GET"], include_in_schema=False)
    app.state.worker = worker
    return app


def serve(generator: Generator, host: str = "127.0.0.1", port: int = 8000, limits: ServerLimits = ServerLimits(),
          allowed_hosts: tuple[str, ...] = ()) -> None:
    """Run the server until interrupted."""
    import uvicorn

    hosts = tuple(LOOPBACK) + tuple(allowed_hosts) + ((host,) if host not in ("0.0.0.0", "::") else ())
    app = create_app(generator, limits, hosts)
    uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=5)
