"""HTTP API for clinical teams (FastAPI), with the review page at ``/``.

``create_app(agent, settings)`` takes an already-built :class:`agent.Agent` (tests pass one backed by
doubles); ``dermgraph serve`` builds one per worker process. Every case is a persisted LangGraph
thread (the agent's checkpointer), so a paused case survives the server being killed.

Security: bearer tokens on every ``/v1`` route (``DERMGRAPH_API_TOKENS`` or a tokens file), upload size
and pixel limits, a per-token rate limit; uploads are re-encoded as PNG with no metadata and stored by
the pixel hash; logs carry case ids and timings only, never metadata, questions or image content.
"""

import asyncio
import logging
import secrets
import threading
import time
import uuid
from collections import deque
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError

try:
    from fastapi import Depends, FastAPI, File, Form, HTTPException, Query, Request, UploadFile
    from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
    from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
    from fastapi.staticfiles import StaticFiles
    from starlette.concurrency import run_in_threadpool
except ImportError as exc:  # pragma: no cover - depends on the extra
    raise ImportError("the HTTP API needs the 'serve' extra: pip install 'dermgraph[serve]'") from exc

from agent.imageio import ImageInputError, image_to_png_bytes, load_image
from agent.limits import InputError, InputLimits, check_metadata, check_question
from agent.persistence import check_case_id
from agent.review import NotAwaitingReview, ReviewDecision
from agent.state import PatientMetadata

log = logging.getLogger("dermgraph.serve")
STATIC = Path(__file__).with_name("static")


class Settings(BaseModel):
    data_dir: Path = Field(Path("~/.local/share/dermgraph"), description="Stored images (by pixel hash) and, by default, the case database.")
    tokens: list[str] = Field(default_factory=list, description="Accepted bearer tokens.")
    auth: bool = Field(True, description="False only for loopback development (--no-auth).")
    max_upload_bytes: int = Field(20 * 1024 * 1024, ge=1024)
    max_pixels: int = Field(50_000_000, ge=1, description="Header-checked pixel limit (agent.imageio bomb guard).")
    rate_limit: int = Field(120, ge=1, description="Requests per minute per token.")
    max_concurrent: int = Field(1, ge=1, description="Cases run at once per worker (the models use the CPU cores).")
    review: str | dict | None = Field("always", description="Review policy of API cases (a 'when' or a policy dict); None: the agent config's.")


class CaseSummary(BaseModel):
    case_id: str
    status: Literal["complete", "awaiting_review", "running", "incomplete"]
    stage: str | None = None
    modality: str | None = None
    label: str | None = None
    label_name: str | None = None
    verdict: str
    confidence: float
    override: str | None = None
    created_at: str | None = None


class CaseResponse(BaseModel):
    case_id: str
    status: Literal["complete", "awaiting_review", "running", "incomplete"]
    diagnosis: dict[str, Any] = Field(description="The Diagnosis (see `dermgraph schema`); includes review_request while paused.")
    image_url: str | None = None


def summary(d) -> CaseSummary:
    return CaseSummary(
        case_id=d.case_id,
        status=d.status,
        stage=d.review_request.stage if d.review_request else None,
        modality=d.modality.label if d.modality else None,
        label=d.label,
        label_name=d.label_name,
        verdict=d.verdict,
        confidence=d.confidence,
        override=d.review.override if d.review else None,
        created_at=d.trace[0].started_at.isoformat() if d.trace else None,
    )


class RateLimiter:
    """Sliding one-minute window per token."""

    def __init__(self, per_minute: int):
        self.per_minute = per_minute
        self.hits: dict[str, deque] = {}
        self.lock = threading.Lock()

    def allow(self, key: str) -> float | None:
        """None when allowed, else seconds until the next request is."""
        now = time.monotonic()
        with self.lock:
            q = self.hits.setdefault(key, deque())
            while q and now - q[0] >= 60:
                q.popleft()
            if len(q) >= self.per_minute:
                return 60 - (now - q[0])
            q.append(now)
            return None


class BodyLimit:
    """ASGI middleware: uploads larger than the limit get 413 before any parsing or storage."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await _too_large(send, self.max_bytes)
        # Buffer the body (bounded) so a stream without Content-Length is held to the same limit.
        chunks, size = [], 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            body = msg.get("body", b"")
            size += len(body)
            if size > self.max_bytes:
                return await _too_large(send, self.max_bytes)
            chunks.append(body)
            if not msg.get("more_body"):
                break
        data = b"".join(chunks)
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": data, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


async def _too_large(send, limit: int):
    import json

    body = json.dumps({"detail": f"upload too large: the limit is {limit} bytes"}).encode()
    await send({"type": "http.response.start", "status": 413, "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def create_app(agent, settings: Settings | None = None):
    """The FastAPI app around ``agent`` (an :class:`agent.Agent`, models loaded lazily, once)."""
    settings = settings or Settings()
    # PIL logs EXIF tags at DEBUG while decoding: uploads' metadata must not reach the logs at any level.
    logging.getLogger("PIL").setLevel(logging.INFO)
    if settings.auth and not settings.tokens:
        raise ValueError("authentication is on but no tokens are configured: set DERMGRAPH_API_TOKENS or --tokens-file (or --no-auth on loopback)")
    data_dir = settings.data_dir.expanduser()
    images = data_dir / "images"
    images.mkdir(parents=True, exist_ok=True)
    limiter = RateLimiter(settings.rate_limit)
    slots = asyncio.Semaphore(settings.max_concurrent)
    bearer = HTTPBearer(auto_error=False, description="A token from DERMGRAPH_API_TOKENS or the tokens file.")

    app = FastAPI(
        title="dermgraph",
        version="1",
        summary="Dermatology image agent with a clinician in the loop. Research software, not a medical device.",
    )
    app.state.agent = agent
    app.state.settings = settings
    app.add_middleware(BodyLimit, max_bytes=settings.max_upload_bytes)

    def authorised(request: Request, creds: HTTPAuthorizationCredentials | None = Depends(bearer)) -> str:
        key = "anonymous"
        if settings.auth:
            token = creds.credentials if creds is not None and creds.scheme.lower() == "bearer" else None
            if token is None or not any(secrets.compare_digest(token.encode(), t.encode()) for t in settings.tokens):
                raise HTTPException(401, "missing or invalid bearer token", headers={"WWW-Authenticate": "Bearer"})
            key = token
        wait = limiter.allow(key)
        if wait is not None:
            raise HTTPException(429, "rate limit exceeded", headers={"Retry-After": str(int(wait) + 1)})
        return key

    def case_id_or_400(case_id: str) -> str:
        try:
            return check_case_id(case_id)
        except ValueError as exc:
            raise HTTPException(400, str(exc)) from None

    def response(d) -> CaseResponse:
        return CaseResponse(
            case_id=d.case_id,
            status=d.status,
            diagnosis=d.model_dump(mode="json"),
            image_url=f"/v1/cases/{d.case_id}/image",
        )

    async def in_pool(fn, *args, **kwargs):
        async with slots:
            return await run_in_threadpool(fn, *args, **kwargs)

    @app.get("/healthz", tags=["service"])
    def healthz() -> dict[str, Any]:
        """Liveness (no authentication)."""
        return {"status": "ok"}

    @app.post("/v1/cases", response_model=CaseResponse, tags=["cases"])
    async def create_case(
        image: UploadFile = File(..., description="The skin image (JPEG, PNG, ...)."),
        question: str | None = Form(None, max_length=2000),
        metadata: str | None = Form(None, description='JSON object: {"age": 60, "sex": "female", "site": "back", ...}'),
        review: Literal["never", "always", "on_abstain", "on_revise"] | None = Form(None, description="Override the server's review policy for this case."),
        _: str = Depends(authorised),
    ) -> CaseResponse:
        """Start a case. Returns its id and either the diagnosis or, when it pauses, the review request."""
        raw = await image.read()
        try:
            loaded = load_image(raw, max_pixels=settings.max_pixels)
        except ImageInputError as exc:
            raise HTTPException(422, f"not a usable image: {exc.reason}") from None
        meta = None
        if metadata:
            try:
                meta = PatientMetadata.model_validate_json(metadata)
            except ValidationError as exc:
                raise HTTPException(422, f"invalid metadata: {exc.errors(include_input=False, include_url=False)}") from None
        try:  # the agent's configured input limits (agent.limits), checked before any model runs
            limits = agent.config.limits or InputLimits()
            check_question(question, limits)
            check_metadata(meta, limits)
        except InputError as exc:
            raise HTTPException(422, str(exc)) from None
        png = image_to_png_bytes(loaded)
        path = images / f"{loaded.sha256}.png"
        if not path.exists():
            tmp = path.with_suffix(f".{uuid.uuid4().hex}.tmp")
            tmp.write_bytes(png)
            tmp.replace(path)
        case_id = uuid.uuid4().hex
        policy = review or settings.review
        t0 = time.perf_counter()
        d = await in_pool(agent.diagnose, loaded.image, question=question, metadata=meta, thread_id=case_id, review=policy if policy else None)
        log.info("case %s created: %s in %.2fs", case_id, d.status, time.perf_counter() - t0)
        return response(d)

    @app.get("/v1/cases", response_model=list[CaseSummary], tags=["cases"])
    async def list_cases(status: Literal["awaiting_review", "complete", "running", "incomplete"] | None = Query(None), _: str = Depends(authorised)) -> list[CaseSummary]:
        """Cases, oldest first; ``?status=awaiting_review`` is the review worklist."""

        def collect():
            out = []
            for cid in agent.case_ids():
                d = agent.case(cid)
                if status is None or d.status == status:
                    out.append(summary(d))
            return out

        return await run_in_threadpool(collect)

    @app.get("/v1/cases/{case_id}", response_model=CaseResponse, tags=["cases"])
    async def get_case(case_id: str, _: str = Depends(authorised)) -> CaseResponse:
        cid = case_id_or_400(case_id)
        try:
            d = await run_in_threadpool(agent.case, cid)
        except KeyError:
            raise HTTPException(404, f"no case {cid}") from None
        return response(d)

    @app.get("/v1/cases/{case_id}/image", tags=["cases"], response_class=FileResponse)
    async def get_image(case_id: str, _: str = Depends(authorised)):
        """The stored image (PNG, no metadata)."""
        cid = case_id_or_400(case_id)
        try:
            d = await run_in_threadpool(agent.case, cid)
        except KeyError:
            raise HTTPException(404, f"no case {cid}") from None
        path = images / f"{d.image_sha256}.png"
        if not d.image_sha256.isalnum() or not path.is_file():
            raise HTTPException(404, "image not stored")
        return FileResponse(path, media_type="image/png")

    @app.post("/v1/cases/{case_id}/review", response_model=CaseResponse, tags=["cases"])
    async def review_case(case_id: str, decision: ReviewDecision, _: str = Depends(authorised)) -> CaseResponse:
        """Resume a paused case with a reviewer's decision: corrected findings (7-point vocabulary), a
        confirmed or overriding diagnosis, a note. Corrected findings re-run retrieval, reasoner and verifier."""
        cid = case_id_or_400(case_id)
        try:
            d = await in_pool(agent.resume, cid, decision)
        except KeyError:
            raise HTTPException(404, f"no case {cid}") from None
        except NotAwaitingReview as exc:
            raise HTTPException(409, str(exc)) from None
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from None
        log.info("case %s reviewed: %s", cid, d.status)
        return response(d)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page():
        return HTMLResponse((STATIC / "index.html").read_text())

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.exception_handler(ImageInputError)
    async def _image_error(request, exc: ImageInputError):
        return JSONResponse({"detail": f"not a usable image: {exc.reason}"}, status_code=422)

    return app


# --- process entry (uvicorn factory) -----------------------------------------------------------

ENV_SETTINGS = "DERMGRAPH_SERVE_SETTINGS"


def app_from_env():
    """uvicorn factory: one Agent (models loaded once) per worker process, settings from the environment."""
    import json
    import os

    from agent.agent import Agent
    from agent.config import ReviewConfig, apply_overrides, load_config
    from serve.backends import load_backends

    spec = json.loads(os.environ.get(ENV_SETTINGS, "{}"))
    settings = Settings.model_validate(spec.get("settings", {}))
    config = load_config(spec.get("config"), spec.get("overrides") or [])
    if config.review is None or config.review.checkpointer == ReviewConfig().checkpointer:
        # Unless the config names a case store, cases live next to their images.
        config = apply_overrides(config, [f"review.checkpointer={settings.data_dir.expanduser() / 'cases.sqlite'}"])
    return create_app(Agent(config, backends=load_backends(spec.get("backends"))), settings)
