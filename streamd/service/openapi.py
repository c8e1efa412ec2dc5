"""The OpenAPI 3.1 description of the daemon's HTTP server, served at ``/api/v1/openapi.json``.

Written by hand rather than generated: aiohttp routes carry no schema, and the API is small
enough that a generator (and its decorators on every handler) would outweigh it. A test
(tests/test_http_client.py) checks every route the server registers appears here, so the two
cannot drift apart.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

PATH = "/api/v1/openapi.json"


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _error(description: str) -> dict[str, Any]:
    return _json(_ref("Error"), description)


def _camera_param() -> dict[str, Any]:
    return {"name": "camera", "in": "path", "required": True, "schema": {"type": "string"}}


def _picture(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"image/jpeg": {"schema": {"type": "string",
                                                                              "format": "binary"}}}}


_FIELDS: list[tuple[str, dict[str, Any], str]] = [
    ("priority", {"type": "integer", "minimum": -10, "maximum": 10, "default": 0}, "higher first"),
    ("conf", {"type": "number", "minimum": 0, "maximum": 1}, "confidence threshold"),
    ("iou", {"type": "number", "minimum": 0, "maximum": 1}, "NMS IoU threshold"),
    ("max_det", {"type": "integer", "minimum": 1}, "boxes kept at most"),
    ("classes", {"type": "string"}, "class ids to keep, comma-separated"),
    ("client_id", {"type": "string", "pattern": "^[A-Za-z0-9_.-]{1,64}$"}, "names the client"),
    ("request_id", {"type": "string"}, "echoed back in the task"),
]

_SCHEMAS: dict[str, Any] = {
    "Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}},
    "Accepted": {"type": "object", "required": ["task_id", "status", "location"],
                 "properties": {"task_id": {"type": "string"}, "status": {"const": "pending"},
                                "location": {"type": "string"}}},
    "Detection": {"type": "object", "required": ["class_id", "label", "confidence", "box"],
                  "properties": {"class_id": {"type": "integer"}, "label": {"type": "string"},
                                 "confidence": {"type": "number"},
                                 "box": {"type": "array", "items": {"type": "number"}, "minItems": 4,
                                         "maxItems": 4, "description": "x1, y1, x2, y2 in pixels"}}},
    "Task": {"type": "object", "required": ["task_id", "status"],
             "properties": {
                 "task_id": {"type": "string"},
                 "status": {"enum": ["pending", "running", "done", "failed", "expired"]},
                 "client_id": {"type": ["string", "null"]},
                 "request_id": {"type": ["string", "integer", "null"]},
                 "width": {"type": "integer"}, "height": {"type": "integer"},
                 "detections": {"type": "array", "items": _ref("Detection")},
                 "timings_ms": {"type": "object", "properties": {k: {"type": "number"}
                                                                 for k in ("queue", "inference", "total")}},
                 "error": {"type": "string"}}},
    "Cameras": {"type": "object", "required": ["cameras"],
                "properties": {"cameras": {"type": "array", "items": {
                    "type": "object", "description": "state, fps, latency_ms, drops, last_error, frame size",
                    "properties": {"id": {"type": "string"}, "state": {"type": "string"},
                                   "fps": {"type": "number"}, "latency_ms": {"type": "number"},
                                   "last_error": {"type": ["string", "null"]}}}}}},
}

_TEXT = {"description": "text", "content": {"text/plain": {"schema": {"type": "string"}}}}
_HTML = {"description": "the live view page", "content": {"text/html": {"schema": {"type": "string"}}}}

DOCUMENT: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {"title": "streamd HTTP API", "version": "1",
             "description": "On-demand detection, cameras, live pictures and push; see docs/HTTP.md."},
    "components": {"schemas": _SCHEMAS,
                   "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                                  "description": "required when http.token is set"}}},
    "security": [{}, {"bearer": []}],
    "paths": {
        "/metrics": {"get": {"summary": "Prometheus metrics (OpenMetrics or gzip when asked)",
                             "responses": {"200": _TEXT}}},
        "/healthz": {"get": {"summary": "health", "responses": {"200": _TEXT, "503": _TEXT}}},
        "/api/v1/detect": {"post": {
            "summary": "a picture to detect on; answered at once with a task id",
            "parameters": [{"name": n, "in": "query", "schema": s, "description": d} for n, s, d in _FIELDS],
            "requestBody": {"required": True, "content": {
                "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
                "image/png": {"schema": {"type": "string", "format": "binary"}},
                "multipart/form-data": {"schema": {
                    "type": "object", "required": ["image"],
                    "properties": {"image": {"type": "string", "format": "binary"},
                                   **{n: {"type": "string", "description": d} for n, _, d in _FIELDS}}}}}},
            "responses": {
                "202": {**_json(_ref("Accepted"), "accepted: poll the task at Location"),
                        "headers": {"Location": {"schema": {"type": "string"}}}},
                "400": _error("a field is wrong (named in error)"),
                "413": _error("body over http.max_body_bytes or picture over http.max_pixels"),
                "415": _error("not a picture"),
                "429": {**_error("the request queue is full: nothing was taken; retry later"),
                        "headers": {"Retry-After": {"schema": {"type": "integer"}}}},
                "503": _error("the daemon is stopping")}}},
        "/api/v1/tasks/{task_id}": {"get": {
            "summary": "a task: pending, running, done, failed or expired",
            "parameters": [{"name": "task_id", "in": "path", "required": True, "schema": {"type": "string"}},
                           {"name": "wait", "in": "query", "schema": {"type": "number", "minimum": 0},
                            "description": "hold the answer up to this many seconds (at most http.max_wait_s)"}],
            "responses": {"200": _json(_ref("Task"), "the task"), "400": _error("wait is not a number"),
                          "404": _error("no such task was ever issued")}}},
        "/api/v1/cameras": {"get": {"summary": "every camera's state, fps, latency, drops and last error",
                                    "responses": {"200": _json(_ref("Cameras"), "the cameras")}}},
        "/api/v1/cameras/{camera}/latest.jpg": {"get": {
            "summary": "the camera's newest frame with its boxes drawn", "parameters": [_camera_param()],
            "responses": {"200": _picture("JPEG"), "404": _error("no such camera, or no frame yet")}}},
        "/api/v1/cameras/{camera}/stream.mjpg": {"get": {
            "summary": "the camera's annotated frames as an MJPEG stream",
            "parameters": [_camera_param(), {"name": "fps", "in": "query", "schema": {"type": "number"},
                                             "description": "frames per second, default 5"}],
            "responses": {"200": {"description": "multipart/x-mixed-replace of JPEG parts"},
                          "404": _error("no such camera")}}},
        "/api/v1/ws": {"get": {
            "summary": "WebSocket: detections, health, events, task results and camera summaries "
                       "(protocol in docs/HTTP.md)",
            "responses": {"101": {"description": "switched to the WebSocket protocol"}}}},
        PATH: {"get": {"summary": "this document",
                       "responses": {"200": {"description": "OpenAPI 3.1", "content": {"application/json": {}}}}}},
        "/": {"get": {"summary": "the live view", "security": [{}], "responses": {"200": _HTML}}},
        "/live.js": {"get": {"summary": "the live view's script", "security": [{}],
                             "responses": {"200": {"description": "JavaScript"}}}},
        "/live.css": {"get": {"summary": "the live view's style sheet", "security": [{}],
                              "responses": {"200": {"description": "CSS"}}}},
    },
}


async def serve(request: web.Request) -> web.Response:
    return web.json_response(DOCUMENT)
