"""HTTP API for clinical teams (FastAPI), with the review page at ``/``.

``create_app(agent, settings)`` takes an already-built :class:`agent.Agent` (tests pass one backed by
doubles); ``dermgraph serve`` builds one per worker process. Every case is a persisted LangGraph
thread (the agent's checkpointer), so a paused case survives the server being killed.

Security: bearer tokens on every ``/v1`` route (``DERMGRAPH_API_TOKENS`` or a tokens file), failed
authentications limited per client address, upload size and pixel limits, a per-token rate limit; uploads
are re-encoded as PNG with no metadata and stored by the pixel hash in a folder private to the user
(0700, files 0600); a review is recorded under the authenticating token's name; logs carry case ids and
timings only, never metadata, questions or image content.
"""

import asyncio
import logging
import os
import secrets
import threading
import time
import uuid
from collections import deque
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

try:
    from fastapi import Depends, FastAPI, File, Form, HTTPException, Query, Request, UploadFile
    from fastapi.exceptions import RequestValidationError
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
from serve.settings import Settings, agent_config, errors_line, one_line, private_file, secure_data_dir

__all__ = ["Settings", "create_app", "app_from_env"]

log = logging.getLogger("dermgraph.serve")
STATIC = Path(__file__).with_name("static")


class ReviewBody(BaseModel):
    """A reviewer's decision as sent over HTTP; the audit trail records it under the token's name."""

    model_config = ConfigDict(extra="forbid")

    reviewer: str | None = Field(
        None, max_length=64, description="Who reviewed, as they call themselves; recorded beside the authenticating token's name (omit: the token's name)."
    )
    findings: dict[str, str] = Field(default_factory=dict, description="Corrected findings: criterion -> value (7-point vocabulary).")
    diagnosis: str | None = Field(None, max_length=120, description="Confirmed (= the model's top label) or overriding diagnosis code.")
    note: str | None = Field(None, max_length=4000)

    @field_validator("reviewer")
    @classmethod
    def _not_blank(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError("reviewer must not be blank (omit it to record the token's name)")
        return v.strip() if v is not None else v


def recorded_reviewer(claimed: str | None, identity: str | None) -> str:
    """The reviewer the audit trail keeps: the token's name, with a differing claimed name beside it."""
    if identity is None:  # --no-auth (loopback development): nothing to tie it to
        return claimed or "anonymous"
    return identity if not claimed or claimed == identity else f"{claimed} [token {identity}]"


def image_detail(exc: ImageInputError) -> str:
    # agent.imageio names the agent's setting; served cases are held to the server's --max-pixels (same value).
    return f"not a usable image: {exc.reason.replace('limits.max_image_pixels', '--max-pixels')}"


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
    """Sliding one-minute window per key (token name, or client address for failed authentications)."""

    max_keys = 10_000

    def __init__(self, per_minute: int):
        self.per_minute = per_minute
        self.hits: dict[str, deque] = {}
        self.lock = threading.Lock()

    def allow(self, key: str, record: bool = True) -> float | None:
        """None when allowed (and counted, unless ``record`` is false), else seconds until the next request is."""
        now = time.monotonic()
        with self.lock:
            if len(self.hits) > self.max_keys:  # many addresses (failed logins): forget the ones idle for a minute
                self.hits = {k: q for k, q in self.hits.items() if q and now - q[-1] < 60}
            q = self.hits.setdefault(key, deque())
            while q and now - q[0] >= 60:
                q.popleft()
            if len(q) >= self.per_minute:
                return 60 - (now - q[0])
            if record:
                q.append(now)
            elif not q:
                del self.hits[key]  # a peek must not leave an entry per address behind
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
    for note in secure_data_dir(data_dir):
        log.warning("data folder made private: %s", note)
    images = data_dir / "images"
    limiter = RateLimiter(settings.rate_limit)
    failures = RateLimiter(settings.auth_failures)
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

    def authorised(request: Request, creds: HTTPAuthorizationCredentials | None = Depends(bearer)) -> str | None:
        """The authenticated token's name (None without authentication)."""
        identity = None
        if settings.auth:
            client = request.client.host if request.client else "unknown"
            # Over the failure limit every request from the address is refused, so a correct guess is not revealed either.
            wait = failures.allow(client, record=False)
            if wait is not None:
                raise HTTPException(429, "too many failed authentication attempts", headers={"Retry-After": str(int(wait) + 1)})
            token = creds.credentials.encode() if creds is not None and creds.scheme.lower() == "bearer" else None
            match = None
            for t in settings.tokens:  # compare with every token: the time taken does not depend on which one matched
                if token is not None and secrets.compare_digest(token, t.secret.get_secret_value().encode()):
                    match = match or t
            if match is None:
                failures.allow(client)
                raise HTTPException(401, "missing or invalid bearer token", headers={"WWW-Authenticate": "Bearer"})
            identity = match.name
        wait = limiter.allow(identity or "anonymous")
        if wait is not None:
            raise HTTPException(429, "rate limit exceeded", headers={"Retry-After": str(int(wait) + 1)})
        return identity

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
        question: str | None = Form(None, description="Up to the agent's limits.max_question_chars (4000 by default)."),
        metadata: str | None = Form(None, description='JSON object: {"age": 60, "sex": "female", "site": "back", ...}'),
        review: Literal["never", "always", "on_abstain", "on_revise"] | None = Form(None, description="Override the server's review policy for this case."),
        _: str = Depends(authorised),
    ) -> CaseResponse:
        """Start a case. Returns its id and either the diagnosis or, when it pauses, the review request."""
        raw = await image.read()
        try:
            loaded = load_image(raw, max_pixels=settings.max_pixels)
        except ImageInputError as exc:
            raise HTTPException(422, image_detail(exc)) from None
        meta = None
        if metadata:
            try:
                meta = PatientMetadata.model_validate_json(metadata)
            except ValidationError as exc:
                raise HTTPException(422, f"invalid metadata: {errors_line(exc.errors(), show_input=False)}") from None
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
            with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:  # patient data: owner only
                f.write(png)
            tmp.replace(path)
        case_id = uuid.uuid4().hex
        policy = settings.review.model_dump(exclude_unset=True) if settings.review is not None else {}
        if review:
            policy["when"] = review  # the case's own 'when'; the server's 'where' still applies
        t0 = time.perf_counter()
        d = await in_pool(agent.diagnose, loaded.image, question=question, metadata=meta, thread_id=case_id, review=policy or None)
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
    async def review_case(case_id: str, body: ReviewBody, identity: str | None = Depends(authorised)) -> CaseResponse:
        """Resume a paused case with a reviewer's decision: corrected findings (7-point vocabulary), a
        confirmed or overriding diagnosis, a note. Corrected findings re-run retrieval, reasoner and verifier.
        The review is recorded under the token's name, with a differing ``reviewer`` beside it."""
        cid = case_id_or_400(case_id)
        try:
            decision = ReviewDecision(reviewer=recorded_reviewer(body.reviewer, identity), findings=body.findings, diagnosis=body.diagnosis, note=body.note)
        except ValidationError as exc:
            raise HTTPException(422, f"invalid review: {errors_line(exc.errors(), show_input=False)}") from None
        t0 = time.perf_counter()
        try:
            d = await in_pool(agent.resume, cid, decision)
        except KeyError:
            raise HTTPException(404, f"no case {cid}") from None
        except NotAwaitingReview as exc:
            raise HTTPException(409, str(exc)) from None
        except ValueError as exc:
            raise HTTPException(422, one_line(exc)) from None
        log.info("case %s reviewed: %s in %.2fs", cid, d.status, time.perf_counter() - t0)
        return response(d)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page():
        return HTMLResponse((STATIC / "index.html").read_text())

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.exception_handler(ImageInputError)
    async def _image_error(request, exc: ImageInputError):
        return JSONResponse({"detail": image_detail(exc)}, status_code=422)

    @app.exception_handler(RequestValidationError)
    async def _invalid_request(request, exc: RequestValidationError):
        # One line like every other error of the API; the input is not echoed (it may be patient data).
        errs = [{**e, "loc": tuple(e.get("loc", ()))[1:] if e.get("loc") else ()} for e in exc.errors()]
        return JSONResponse({"detail": f"invalid request: {errors_line(errs, show_input=False)}"}, status_code=422)

    return app


# --- process entry (uvicorn factory) -----------------------------------------------------------

ENV_SETTINGS = "DERMGRAPH_SERVE_SETTINGS"
"""What ``dermgraph serve`` hands its workers: settings, the tokens file's path, config. Never the tokens themselves."""


def log_config() -> dict[str, Any]:
    """uvicorn's logging plus ``dermgraph.serve`` (case ids and timings) at INFO; PIL held at INFO (EXIF at DEBUG)."""
    import copy

    from uvicorn.config import LOGGING_CONFIG

    cfg = copy.deepcopy(LOGGING_CONFIG)
    cfg["loggers"]["dermgraph"] = {"handlers": ["default"], "level": "INFO", "propagate": False}
    cfg["loggers"]["PIL"] = {"level": "INFO"}
    return cfg


def app_from_env():
    """uvicorn factory: one Agent (models loaded once) per worker process, settings from the environment."""
    import json

    from agent.agent import Agent
    from serve.backends import load_backends
    from serve.settings import load_tokens

    os.umask(0o077)  # anything this process creates (SQLite files included) is the user's alone
    spec = json.loads(os.environ.get(ENV_SETTINGS, "{}"))
    settings = Settings.model_validate(spec.get("settings", {}))
    if settings.auth:
        # Re-read here rather than passed through the environment, which subprocesses inherit.
        tokens_file = spec.get("tokens_file")
        settings = settings.model_copy(update={"tokens": load_tokens(Path(tokens_file) if tokens_file else None)})
    config = agent_config(settings, spec.get("config"), spec.get("overrides"))
    secure_data_dir(settings.data_dir)
    db = Path(config.review.checkpointer).expanduser()
    if db.parent == settings.data_dir.expanduser():
        private_file(db)
    return create_app(Agent(config, backends=load_backends(spec.get("backends"))), settings)
