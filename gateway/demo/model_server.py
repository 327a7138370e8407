"""Demo model server: a tiny but real classifier behind the KServe V2 / OpenAI-like APIs.

The gateway needs something honest to route to in demos and tests: two versions of one model
whose answers mostly agree (so shadow/canary comparisons have signal), an SSE endpoint (so
streaming proxying is exercised) and fault knobs (so rollback and alerting can be triggered on
demand). Everything is deterministic: fixed weights, seeded fault draws.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import random
import signal
import sys
import time
import uuid
import zlib
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Final

import orjson
from aiohttp import web

__all__ = [
    "FEATURES",
    "LABELS",
    "VERSIONS",
    "Faults",
    "FaultsError",
    "add_arguments",
    "build_app",
    "predict",
    "run",
    "start_model_server",
]

FEATURES: Final[tuple[str, ...]] = ("sepal_length", "sepal_width", "petal_length", "petal_width")
LABELS: Final[tuple[str, ...]] = ("setosa", "versicolor", "virginica")
VERSIONS: Final[tuple[str, ...]] = ("v1", "v2")
PLATFORM: Final = "modelgate-demo"
N_FEATURES: Final = len(FEATURES)

# (weights per feature, intercept) per label. v1 is close to a multinomial logistic regression
# fitted on iris; v2 is a "retrained" nudge of it that disagrees with v1 on ~5% of inputs drawn
# uniformly from realistic iris ranges -- enough for shadow/canary diffs to be visible.
_RAW_WEIGHTS: Final[dict[str, tuple[tuple[tuple[float, ...], float], ...]]] = {
    "v1": (
        ((-0.42, 0.97, -2.52, -1.08), 9.85),
        ((0.53, -0.32, -0.21, -0.94), 2.24),
        ((-0.11, -0.65, 2.73, 2.02), -12.09),
    ),
    "v2": (
        ((-0.40, 0.99, -2.50, -1.10), 9.80),
        ((0.55, -0.30, -0.19, -0.92), 2.36),
        ((-0.12, -0.66, 2.72, 2.00), -12.05),
    ),
}


@dataclass(frozen=True, slots=True)
class _Model:
    """Precomputed per-version parameters so predict() does no per-call setup."""

    weights: tuple[tuple[float, ...], ...]
    intercepts: tuple[float, ...]


_MODELS: Final[dict[str, _Model]] = {
    version: _Model(
        weights=tuple(tuple(float(w) for w in ws) for ws, _ in rows),
        intercepts=tuple(float(b) for _, b in rows),
    )
    for version, rows in _RAW_WEIGHTS.items()
}


def _model(version: str) -> _Model:
    try:
        return _MODELS[version]
    except KeyError:
        raise ValueError(f"unknown model version {version!r}; expected one of {VERSIONS}") from None


def predict(version: str, rows: Sequence[Sequence[float]]) -> list[tuple[str, float]]:
    """Classify rows of 4 features; pure so tests can compute the expected server answers.

    Returns (label, probability of that label) per row. Raises ValueError on an unknown
    version or a row that does not have exactly 4 values.
    """
    model = _model(version)
    out: list[tuple[str, float]] = []
    for row in rows:
        if len(row) != N_FEATURES:
            raise ValueError(f"expected {N_FEATURES} features per row, got {len(row)}")
        logits = [
            b + sum(w * x for w, x in zip(ws, row, strict=True))
            for ws, b in zip(model.weights, model.intercepts, strict=True)
        ]
        top = max(range(len(logits)), key=logits.__getitem__)
        peak = logits[top]
        # Softmax probability of the arg-max, shifted by the max for numerical stability.
        total = sum(math.exp(z - peak) for z in logits)
        out.append((LABELS[top], 1.0 / total))
    return out


# --------------------------------------------------------------------------------------------
# Fault knobs


class FaultsError(ValueError):
    """A fault update was rejected; the message is safe to show to the client."""


_RATE_KEYS: Final = ("error_rate", "null_rate")
_FAULT_KEYS: Final = frozenset({"error_rate", "latency_ms", "null_rate", "ttft_ms"})
_DELAY_KEYS: Final = ("latency_ms", "ttft_ms")


def _check_number(key: str, value: object) -> float:
    # bool is an int subclass; `true` as a rate is almost certainly a client bug.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise FaultsError(f"{key} must be a number")
    number = float(value)
    if not math.isfinite(number):
        raise FaultsError(f"{key} must be finite")
    if key in _RATE_KEYS and not 0.0 <= number <= 1.0:
        raise FaultsError(f"{key} must be between 0 and 1")
    if key in _DELAY_KEYS and number < 0.0:
        raise FaultsError(f"{key} must be >= 0")
    return number


@dataclass(slots=True)
class Faults:
    """Mutable fault knobs shared by a server's handlers; changed live through POST /faults."""

    error_rate: float = 0.0
    latency_ms: float = 0.0
    null_rate: float = 0.0
    # Streamed chat answers only: a delay between the response head and the first token
    # (a candidate "slow to start": its time to first token grows, the rest of it does not).
    ttft_ms: float = 0.0

    def __post_init__(self) -> None:
        for key in _FAULT_KEYS:
            setattr(self, key, _check_number(key, getattr(self, key)))

    def update(self, changes: object) -> None:
        """Apply a subset of knobs atomically: validate everything first, then assign."""
        if not isinstance(changes, Mapping):
            raise FaultsError("body must be a JSON object")
        unknown = sorted(str(k) for k in changes if k not in _FAULT_KEYS)
        if unknown:
            raise FaultsError(f"unknown fault keys: {', '.join(unknown)}")
        checked = {key: _check_number(key, value) for key, value in changes.items()}
        for key, value in checked.items():
            setattr(self, key, value)

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def default_seed(version: str) -> int:
    """Stable across processes (unlike hash()), so a version's fault pattern is repeatable."""
    return zlib.crc32(version.encode())


# --------------------------------------------------------------------------------------------
# HTTP helpers


@dataclass(slots=True)
class _State:
    version: str
    model_name: str
    faults: Faults
    rng: random.Random


_STATE: Final = web.AppKey("model_server_state", _State)

_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _json(data: object, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def _error(status: int, message: str) -> web.Response:
    return _json({"error": message}, status=status)


class _BadRequest(Exception):
    """Raised while parsing a request body; becomes a 400 JSON error."""


async def _read_json(request: web.Request) -> Any:
    raw = await request.read()
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise _BadRequest(f"invalid JSON: {exc}") from None


@web.middleware
async def _json_errors(request: web.Request, handler: _Handler) -> web.StreamResponse:
    """Clients of a model server expect JSON errors, including aiohttp's own 404/405."""
    try:
        return await handler(request)
    except _BadRequest as exc:
        return _error(400, str(exc))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        response = _error(exc.status, exc.reason)
        if "Allow" in exc.headers:
            response.headers["Allow"] = exc.headers["Allow"]
        return response


async def _stamp_version(request: web.Request, response: web.StreamResponse) -> None:
    """Tag every response (errors and SSE too) so the gateway can attribute it to a version."""
    response.headers["X-Model-Version"] = request.app[_STATE].version


class _InjectedError(Exception):
    """Signals an injected fault; turned into HTTP 500 by the handler."""


async def _apply_faults(state: _State) -> bool:
    """Sleep for the configured latency, then decide error / null outputs.

    Both draws happen on every faulted request, so the random stream advances identically
    whatever the rates are and runs stay repeatable. Returns whether outputs should be null;
    raises _InjectedError for an injected failure.
    """
    error_draw = state.rng.random()
    null_draw = state.rng.random()
    if state.faults.latency_ms > 0:
        await asyncio.sleep(state.faults.latency_ms / 1000.0)
    if error_draw < state.faults.error_rate:
        raise _InjectedError
    return null_draw < state.faults.null_rate


def _check_model(state: _State, request: web.Request) -> web.Response | None:
    name = request.match_info["name"]
    if name != state.model_name:
        return _error(404, f"unknown model {name!r}")
    return None


# --------------------------------------------------------------------------------------------
# KServe V2 / Open Inference Protocol

_NUMERIC_DATATYPES: Final = frozenset(
    "FP16 FP32 FP64 INT8 INT16 INT32 INT64 UINT8 UINT16 UINT32 UINT64".split()
)


def _feature(value: object) -> float:
    """Missing values (null, NaN) become 0.0 so the model still answers, like a lax server."""
    if value is None:
        return 0.0
    if isinstance(value, bool):
        raise _BadRequest("input values must be numbers or null")
    if isinstance(value, int | float):
        number = float(value)
        return number if math.isfinite(number) else 0.0
    if isinstance(value, str) and value.strip().lower() == "nan":
        return 0.0  # JSON has no NaN literal; some clients send it as a string.
    raise _BadRequest("input values must be numbers or null")


def _parse_rows(body: object) -> tuple[str | None, list[list[float]]]:
    """Extract (request id, feature rows) from a V2 infer body, validating shape vs data."""
    if not isinstance(body, dict):
        raise _BadRequest("body must be a JSON object")
    request_id = body.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise _BadRequest("id must be a string")
    inputs = body.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise _BadRequest("inputs must be a non-empty list")
    tensor = inputs[0]
    if not isinstance(tensor, dict):
        raise _BadRequest("inputs[0] must be an object")
    datatype = tensor.get("datatype", "FP32")
    if datatype not in _NUMERIC_DATATYPES:
        raise _BadRequest(f"unsupported datatype {datatype!r}")
    shape = tensor.get("shape")
    if (
        not isinstance(shape, list)
        or len(shape) != 2
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
        or shape[1] != N_FEATURES
    ):
        raise _BadRequest(f"shape must be [N, {N_FEATURES}]")
    n_rows = shape[0]
    data = tensor.get("data")
    if not isinstance(data, list):
        raise _BadRequest("data must be a list")
    if data and all(isinstance(item, list) for item in data):
        if len(data) != n_rows or any(len(row) != N_FEATURES for row in data):
            raise _BadRequest(f"data does not match shape {shape}")
        rows = [[_feature(v) for v in row] for row in data]
    elif any(isinstance(item, list | dict) for item in data):
        raise _BadRequest("data must be a flat list or a list of rows")
    else:
        if len(data) != n_rows * N_FEATURES:
            raise _BadRequest(f"data does not match shape {shape}")
        flat = [_feature(v) for v in data]
        rows = [flat[i : i + N_FEATURES] for i in range(0, len(flat), N_FEATURES)]
    return request_id, rows


async def _infer(request: web.Request) -> web.Response:
    state = request.app[_STATE]
    missing = _check_model(state, request)
    if missing is not None:
        return missing
    try:
        null_outputs = await _apply_faults(state)
    except _InjectedError:
        return _error(500, "injected fault")
    request_id, rows = _parse_rows(await _read_json(request))
    labels: list[str] | None = None
    probabilities: list[float] | None = None
    if not null_outputs:
        predictions = predict(state.version, rows)
        labels = [label for label, _ in predictions]
        probabilities = [prob for _, prob in predictions]
    return _json(
        {
            "model_name": state.model_name,
            "model_version": state.version,
            "id": request_id if request_id is not None else uuid.uuid4().hex,
            "outputs": [
                {"name": "label", "shape": [len(rows)], "datatype": "BYTES", "data": labels},
                {
                    "name": "probability",
                    "shape": [len(rows)],
                    "datatype": "FP32",
                    "data": probabilities,
                },
            ],
        }
    )


async def _live(request: web.Request) -> web.Response:
    return _json({"live": True})


async def _ready(request: web.Request) -> web.Response:
    return _json({"ready": True})


async def _server_metadata(request: web.Request) -> web.Response:
    state = request.app[_STATE]
    return _json({"name": PLATFORM, "version": state.version, "extensions": []})


async def _model_metadata(request: web.Request) -> web.Response:
    state = request.app[_STATE]
    missing = _check_model(state, request)
    if missing is not None:
        return missing
    return _json(
        {
            "name": state.model_name,
            "versions": [state.version],
            "model_version": state.version,
            "platform": PLATFORM,
            "inputs": [
                {
                    "name": "input-0",
                    "datatype": "FP32",
                    "shape": [-1, N_FEATURES],
                    "parameters": {"features": list(FEATURES)},
                }
            ],
            "outputs": [
                {
                    "name": "label",
                    "datatype": "BYTES",
                    "shape": [-1],
                    "parameters": {"labels": list(LABELS)},
                },
                {"name": "probability", "datatype": "FP32", "shape": [-1]},
            ],
        }
    )


async def _model_ready(request: web.Request) -> web.Response:
    state = request.app[_STATE]
    missing = _check_model(state, request)
    if missing is not None:
        return missing
    return _json({"name": state.model_name, "model_version": state.version, "ready": True})


# --------------------------------------------------------------------------------------------
# OpenAI-like chat completions (exists to exercise SSE proxying)

_MAX_ECHO_WORDS: Final = 256
_DEFAULT_STREAM_DELAY_MS: Final = 20.0
_MAX_STREAM_DELAY_MS: Final = 10_000.0


def _last_user_text(messages: object) -> str:
    if not isinstance(messages, list) or not messages:
        raise _BadRequest("messages must be a non-empty list")
    for message in reversed(messages):
        if not isinstance(message, dict):
            raise _BadRequest("each message must be an object")
        if message.get("role") != "user":
            continue
        content = message.get("content")
        if isinstance(content, str):
            return content
        if isinstance(content, list):  # OpenAI content parts: keep the text ones.
            return " ".join(
                str(part.get("text", ""))
                for part in content
                if isinstance(part, dict) and part.get("type") == "text"
            )
        raise _BadRequest("message content must be a string or a list of parts")
    raise _BadRequest("no user message")


def reply_tokens(version: str, text: str) -> list[str]:
    """Deterministic reply, split into tokens whose concatenation is the full reply.

    v1 and v2 differ slightly (prefix wording and final punctuation), so shadow comparisons of
    streamed text have something to find.
    """
    words = text.split()[:_MAX_ECHO_WORDS] or ["(nothing)"]
    if version == "v1":
        reply = ["You", "said:", *words]
    else:
        reply = ["You", "wrote:", *words[:-1], words[-1] + "!"]
    return [reply[0], *(" " + word for word in reply[1:])]


def _parse_chat(body: object) -> tuple[str | None, str, bool, float, bool]:
    """Validate a chat body; returns (model, last user text, stream, delay ms, stamps)."""
    if not isinstance(body, dict):
        raise _BadRequest("body must be a JSON object")
    text = _last_user_text(body.get("messages"))
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise _BadRequest("model must be a string")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise _BadRequest("stream must be a boolean")
    delay = body.get("stream_delay_ms", _DEFAULT_STREAM_DELAY_MS)
    if (
        isinstance(delay, bool)
        or not isinstance(delay, int | float)
        or not 0.0 <= float(delay) <= _MAX_STREAM_DELAY_MS
    ):
        raise _BadRequest(f"stream_delay_ms must be a number in [0, {_MAX_STREAM_DELAY_MS:g}]")
    stamps = body.get("stream_timestamps", False)
    if not isinstance(stamps, bool):
        raise _BadRequest("stream_timestamps must be a boolean")
    return model, text, stream, float(delay), stamps


async def _chat(request: web.Request) -> web.StreamResponse:
    state = request.app[_STATE]
    try:
        await _apply_faults(state)  # null_rate has no meaning for chat; only latency/errors.
    except _InjectedError:
        return _error(500, "injected fault")
    model, text, stream, delay_ms, stamps = _parse_chat(await _read_json(request))
    tokens = reply_tokens(state.version, text)
    prompt_tokens = len(text.split())
    completion_id = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    model_field = model or state.model_name
    usage = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": len(tokens),
        "total_tokens": prompt_tokens + len(tokens),
    }
    if not stream:
        return _json(
            {
                "id": completion_id,
                "object": "chat.completion",
                "created": created,
                "model": model_field,
                "model_version": state.version,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "".join(tokens)},
                        "finish_reason": "stop",
                    }
                ],
                "usage": usage,
            }
        )

    def chunk(delta: dict[str, str] | None, finish_reason: str | None) -> bytes:
        payload: dict[str, Any] = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model_field,
            "model_version": state.version,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
        }
        if delta is None:  # the closing event: OpenAI's `stream_options.include_usage` form
            payload["choices"] = []
            payload["usage"] = usage
        event = b"data: " + orjson.dumps(payload) + b"\n\n"
        # `stream_timestamps`: a comment line with the send time (clients ignore comments;
        # tests use it to see that events reach them one by one).
        return b": sent %.6f\n%s" % (time.time(), event) if stamps else event

    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    await response.prepare(request)
    try:
        if state.faults.ttft_ms > 0:
            await asyncio.sleep(state.faults.ttft_ms / 1000.0)
        for index, token in enumerate(tokens):
            if index and delay_ms > 0:
                await asyncio.sleep(delay_ms / 1000.0)
            delta = {"role": "assistant", "content": token} if index == 0 else {"content": token}
            await response.write(chunk(delta, None))
        await response.write(chunk({}, "stop"))
        await response.write(chunk(None, None))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
    except ConnectionResetError:
        pass  # Client went away mid-stream; nothing left to tell it.
    return response


# --------------------------------------------------------------------------------------------
# /faults


async def _get_faults(request: web.Request) -> web.Response:
    return _json(request.app[_STATE].faults.as_dict())


async def _post_faults(request: web.Request) -> web.Response:
    faults = request.app[_STATE].faults
    try:
        faults.update(await _read_json(request))
    except FaultsError as exc:
        return _error(400, str(exc))
    return _json(faults.as_dict())


# --------------------------------------------------------------------------------------------
# Public entry points


def build_app(
    version: str,
    model_name: str = "classifier",
    faults: Faults | None = None,
    *,
    seed: int | None = None,
) -> web.Application:
    """Build the aiohttp app for one model version; `faults` may be shared and mutated live."""
    _model(version)  # Fail fast on an unknown version.
    state = _State(
        version=version,
        model_name=model_name,
        faults=faults if faults is not None else Faults(),
        rng=random.Random(default_seed(version) if seed is None else seed),
    )
    app = web.Application(middlewares=[_json_errors])
    app[_STATE] = state
    app.on_response_prepare.append(_stamp_version)
    app.router.add_get("/v2", _server_metadata)
    app.router.add_get("/v2/health/live", _live)
    app.router.add_get("/v2/health/ready", _ready)
    app.router.add_get("/v2/models/{name}", _model_metadata)
    app.router.add_get("/v2/models/{name}/ready", _model_ready)
    app.router.add_post("/v2/models/{name}/infer", _infer)
    app.router.add_post("/v1/chat/completions", _chat)
    app.router.add_get("/faults", _get_faults)
    app.router.add_post("/faults", _post_faults)
    return app


async def start_model_server(
    version: str,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    model_name: str = "classifier",
    error_rate: float = 0.0,
    latency_ms: float = 0.0,
    null_rate: float = 0.0,
    ttft_ms: float = 0.0,
    seed: int | None = None,
    shutdown_timeout: float = 1.0,
) -> tuple[web.AppRunner, int]:
    """Start a server in the running loop; returns the runner (call cleanup()) and bound port.

    The short shutdown_timeout keeps test/demo teardown fast even with open SSE streams.
    """
    faults = Faults(error_rate=error_rate, latency_ms=latency_ms, null_rate=null_rate,
                    ttft_ms=ttft_ms)
    app = build_app(version, model_name, faults, seed=seed)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=shutdown_timeout)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound_port = int(runner.addresses[0][1])
    except BaseException:
        await runner.cleanup()
        raise
    return runner, bound_port


def _rate(text: str) -> float:
    try:
        return _check_number("error_rate", float(text))
    except (ValueError, FaultsError) as exc:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from exc


def _non_negative(text: str) -> float:
    try:
        return _check_number("latency_ms", float(text))
    except (ValueError, FaultsError) as exc:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from exc


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the model-server flags on the CLI's (sub)parser."""
    parser.add_argument("--version", choices=VERSIONS, default="v1", help="model version")
    parser.add_argument("--host", default="127.0.0.1", help="bind address")
    parser.add_argument("--port", type=int, default=9001, help="bind port (0 = any free port)")
    parser.add_argument("--model-name", default="classifier", help="V2 model name")
    parser.add_argument("--error-rate", type=_rate, default=0.0, help="fraction of 500s")
    parser.add_argument("--latency-ms", type=_non_negative, default=0.0, help="added latency")
    parser.add_argument("--null-rate", type=_rate, default=0.0, help="fraction of null outputs")
    parser.add_argument("--ttft-ms", type=_non_negative, default=0.0,
                        help="delay before the first token of a streamed chat answer")
    parser.add_argument(
        "--seed", type=int, default=None, help="fault RNG seed (default: derived from version)"
    )


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


async def _serve(args: argparse.Namespace) -> int:
    try:
        runner, port = await start_model_server(
            args.version,
            args.host,
            args.port,
            model_name=args.model_name,
            error_rate=args.error_rate,
            latency_ms=args.latency_ms,
            null_rate=args.null_rate,
            ttft_ms=args.ttft_ms,
            seed=args.seed,
        )
    except OSError as exc:
        print(f"model server: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    print(
        f"model server {args.version} listening on http://{_url_host(args.host)}:{port}", flush=True
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    handled: list[signal.Signals] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
            handled.append(sig)
        except NotImplementedError:  # Windows: fall back to KeyboardInterrupt.
            pass
    try:
        await stop.wait()
    finally:
        for sig in handled:
            loop.remove_signal_handler(sig)
        await runner.cleanup()
    return 0


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def run(args: argparse.Namespace) -> int:
    """CLI entry: serve until SIGINT/SIGTERM, on uvloop when it is installed."""
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        try:
            return runner.run(_serve(args))
        except KeyboardInterrupt:
            return 0
