"""A fake Telegram Bot API server on 127.0.0.1 for offline end-to-end tests of the bot.

A real HTTP/1.1 server (http.server in a thread) so that the real python-telegram-bot client,
pointed here with base_url/base_file_url, goes through its whole request path: form and
multipart encoding, long polling, file downloads. Tests play the users: they inject updates
(photos, commands, button taps) and read back what the bot called, uploads included.
"""

from __future__ import annotations

import asyncio
import email.parser
import email.policy
import io
import itertools
import json
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, TypeVar
from urllib.parse import parse_qsl, unquote, urlparse

from PIL import Image

T = TypeVar("T")

TOKEN = "123456:FAKE-test-token_abcdefghijklmnopqrstu"
BOT_USER = {"id": 123456, "is_bot": True, "first_name": "FaceChange", "username": "facechange_test_bot",
            "can_join_groups": True, "can_read_all_group_messages": True, "supports_inline_queries": False}
LONG_POLL_CAP = 0.5  # seconds a getUpdates call may hang: short, so that stopping a bot is quick


@dataclass
class Call:
    """One Bot API call the bot made."""

    method: str
    params: dict[str, Any]
    files: dict[str, bytes]
    filenames: dict[str, str] = field(default_factory=dict)
    result: Any = None

    def upload(self, param: str) -> bytes:
        """The bytes uploaded for ``param`` (directly, or through an attach:// reference)."""
        value = self.params.get(param)
        if isinstance(value, dict):  # InputMedia
            value = value.get("media")
        if isinstance(value, str) and value.startswith("attach://"):
            return self.files[value.removeprefix("attach://")]
        return self.files[param]


@dataclass
class _State:
    updates: list[dict[str, Any]] = field(default_factory=list)
    calls: list[Call] = field(default_factory=list)
    files: dict[str, bytes] = field(default_factory=dict)
    messages: dict[tuple[int, int], dict[str, Any]] = field(default_factory=dict)
    resets: dict[str, int] = field(default_factory=dict)  # Bot API method or "file" -> connections still to reset


class FakeTelegram:
    def __init__(self, token: str = TOKEN) -> None:
        self.token = token
        self.state = _State()
        self.lock = threading.Condition()
        self._ids = itertools.count(1)
        self.server = _Server(("127.0.0.1", 0), self._handler_class())
        self.thread = threading.Thread(target=self.server.serve_forever, name="fake-telegram", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def start(self) -> FakeTelegram:
        self.thread.start()
        return self

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    # -- the users' side -------------------------------------------------------------------

    @staticmethod
    def user(user_id: int, language_code: str = "en") -> dict[str, Any]:
        return {"id": user_id, "is_bot": False, "first_name": f"User{user_id}", "language_code": language_code}

    @staticmethod
    def private_chat(user: dict[str, Any]) -> dict[str, Any]:
        return {"id": user["id"], "type": "private", "first_name": user["first_name"]}

    @staticmethod
    def group_chat(chat_id: int) -> dict[str, Any]:
        return {"id": -abs(chat_id), "type": "group", "title": "Friends"}

    def add_file(self, data: bytes) -> str:
        file_id = f"file-{next(self._ids)}"
        with self.lock:
            self.state.files[file_id] = data
        return file_id

    def _push(self, kind: str, payload: dict[str, Any]) -> dict[str, Any]:
        with self.lock:
            self.state.updates.append({"update_id": next(self._ids), kind: payload})
            self.lock.notify_all()
        return payload

    def _user_message(self, user: dict[str, Any], chat: dict[str, Any] | None, **content: Any) -> dict[str, Any]:
        return self._push("message", {"message_id": next(self._ids), "date": int(time.time()), "from": user,
                                      "chat": chat or self.private_chat(user), **content})

    def send_text(self, user: dict[str, Any], text: str, chat: dict[str, Any] | None = None) -> dict[str, Any]:
        command = text.split()[0] if text.startswith("/") else ""
        entities = [{"type": "bot_command", "offset": 0, "length": len(command)}] if command else []
        return self._user_message(user, chat, text=text, entities=entities)

    def send_photo(self, user: dict[str, Any], data: bytes, chat: dict[str, Any] | None = None,
                   media_group_id: str | None = None) -> dict[str, Any]:
        file_id = self.add_file(data)
        width, height = Image.open(io.BytesIO(data)).size
        sizes = [{"file_id": file_id, "file_unique_id": f"u{file_id}", "width": width, "height": height,
                  "file_size": len(data)}]
        extra = {"media_group_id": media_group_id} if media_group_id else {}
        return self._user_message(user, chat, photo=sizes, **extra)

    def send_document(self, user: dict[str, Any], data: bytes, file_name: str, mime_type: str,
                      chat: dict[str, Any] | None = None) -> dict[str, Any]:
        file_id = self.add_file(data)
        document = {"file_id": file_id, "file_unique_id": f"u{file_id}", "file_name": file_name,
                    "mime_type": mime_type, "file_size": len(data)}
        return self._user_message(user, chat, document=document)

    def tap(self, user: dict[str, Any], message: dict[str, Any], data: str) -> str:
        query_id = f"q{next(self._ids)}"
        self._push("callback_query", {"id": query_id, "from": user, "message": message, "chat_instance": "ci",
                                      "data": data})
        return query_id

    def reset_connections(self, target: str, count: int) -> None:
        """The next ``count`` requests for ``target`` (a Bot API method, or "file" for downloads) are answered
        with a TCP reset instead of a response: the network fault a bot must survive."""
        with self.lock:
            self.state.resets[target] = count

    def _take_reset(self, target: str) -> bool:
        with self.lock:
            if self.state.resets.get(target, 0) <= 0:
                return False
            self.state.resets[target] -= 1
            return True

    # -- what the bot did ------------------------------------------------------------------

    def calls(self, method: str | None = None, chat_id: int | None = None) -> list[Call]:
        with self.lock:
            return [c for c in self.state.calls if (method is None or c.method == method)
                    and (chat_id is None or c.params.get("chat_id") == chat_id)]

    def answers(self, query_id: str) -> list[Call]:
        return [c for c in self.calls("answerCallbackQuery") if c.params.get("callback_query_id") == query_id]

    def message(self, chat_id: int, message_id: int) -> dict[str, Any]:
        with self.lock:
            return json.loads(json.dumps(self.state.messages[(chat_id, message_id)]))

    async def wait_for(self, predicate: Callable[[], T], timeout: float = 60.0) -> T:
        """Polls ``predicate`` until it returns something truthy, and returns that."""
        deadline = time.monotonic() + timeout
        while not (value := predicate()):
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout:g} s waiting for the bot")
            await asyncio.sleep(0.02)
        return value

    # -- the Bot API -----------------------------------------------------------------------

    def _new_message(self, chat_id: int, content: dict[str, Any]) -> dict[str, Any]:
        chat = {"id": chat_id, "type": "private" if chat_id > 0 else "group"}
        message = {"message_id": next(self._ids), "date": int(time.time()), "chat": chat, "from": BOT_USER, **content}
        self.state.messages[(chat_id, message["message_id"])] = message
        return message

    def _stored_file(self, data: bytes, kind: str) -> dict[str, Any]:
        file_id = f"{kind}-{next(self._ids)}"
        self.state.files[file_id] = data
        return {"file_id": file_id, "file_unique_id": f"u{file_id}", "file_size": len(data)}

    def _photo(self, data: bytes) -> list[dict[str, Any]]:
        width, height = Image.open(io.BytesIO(data)).size
        return [{**self._stored_file(data, "photo"), "width": width, "height": height}]

    def _markup(self, params: dict[str, Any]) -> dict[str, Any]:
        return {"reply_markup": params["reply_markup"]} if params.get("reply_markup") else {}

    def _edit(self, params: dict[str, Any], **changes: Any) -> dict[str, Any]:
        key = (params["chat_id"], params["message_id"])
        if key not in self.state.messages:
            raise _ApiError(400, "Bad Request: message to edit not found")
        message = self.state.messages[key]
        message.pop("reply_markup", None)
        message.update(changes, **self._markup(params))
        return message

    def _api(self, method: str, call: Call) -> Any:  # noqa: C901 - one branch per Bot API method
        params = call.params
        with self.lock:
            if method == "getMe":
                return BOT_USER
            if method in ("deleteWebhook", "setWebhook", "setMyCommands", "sendChatAction", "answerCallbackQuery"):
                return True
            if method == "sendMessage":
                return self._new_message(params["chat_id"], {"text": params["text"], **self._markup(params)})
            if method == "sendPhoto":
                return self._new_message(params["chat_id"], {"photo": self._photo(call.upload("photo")),
                                                             "caption": params.get("caption", ""),
                                                             **self._markup(params)})
            if method == "sendDocument":
                document = {**self._stored_file(call.upload("document"), "document"),
                            "file_name": call.filenames.get("document", "")}
                return self._new_message(params["chat_id"], {"document": document})
            if method == "editMessageMedia":
                return self._edit(params, photo=self._photo(call.upload("media")),
                                  caption=params["media"].get("caption", ""))
            if method == "editMessageCaption":
                return self._edit(params, caption=params.get("caption", ""))
            if method == "editMessageReplyMarkup":
                return self._edit(params)
            if method == "editMessageText":
                return self._edit(params, text=params["text"])
            if method == "getFile":
                if params["file_id"] not in self.state.files:
                    raise _ApiError(400, "Bad Request: wrong file_id")
                file_id = params["file_id"]
                return {"file_id": file_id, "file_unique_id": f"u{file_id}",
                        "file_size": len(self.state.files[file_id]), "file_path": f"files/{file_id}"}
        raise _ApiError(404, f"Not Found: method {method} is not faked")

    def _get_updates(self, params: dict[str, Any]) -> list[dict[str, Any]]:
        offset = int(params.get("offset") or 0)
        deadline = time.monotonic() + min(float(params.get("timeout") or 0), LONG_POLL_CAP)
        with self.lock:
            self.state.updates = [u for u in self.state.updates if u["update_id"] >= offset]
            while not self.state.updates and (left := deadline - time.monotonic()) > 0:
                self.lock.wait(left)
            return list(self.state.updates)

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as httpx expects of a real server

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
                pass

            def _send(self, status: int, body: bytes, content_type: str = "application/json") -> None:
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", content_type)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):  # a stopping bot drops its long poll
                    self.close_connection = True

            def _reset(self) -> None:
                # Linger 0: closing sends RST, as a dropped connection does, not an orderly FIN.
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.close_connection = True

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                if fake._take_reset("file"):
                    self._reset()
                    return
                prefix = f"/file/bot{fake.token}/files/"
                path = unquote(urlparse(self.path).path)  # PTB percent-encodes the token's colon in file URLs
                with fake.lock:
                    data = fake.state.files.get(path.removeprefix(prefix)) if path.startswith(prefix) else None
                if data is None:
                    self._send(404, b"not found", "text/plain")
                else:
                    self._send(200, data, "application/octet-stream")

            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                path = unquote(urlparse(self.path).path)  # PTB percent-encodes the token's colon in file URLs
                prefix = f"/bot{fake.token}/"
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if not path.startswith(prefix):
                    self._reply_error(_ApiError(401, "Unauthorized"))
                    return
                method = path.removeprefix(prefix)
                if fake._take_reset(method):
                    self._reset()
                    return
                params, files, filenames = _parse_body(self.headers.get("Content-Type", ""), body)
                try:
                    if method == "getUpdates":
                        result: Any = fake._get_updates(params)
                    else:
                        call = Call(method, params, files, filenames)
                        result = fake._api(method, call)
                        call.result = json.loads(json.dumps(result))  # a snapshot: later edits change the message
                        with fake.lock:
                            fake.state.calls.append(call)
                except _ApiError as exc:
                    self._reply_error(exc)
                    return
                self._send(200, json.dumps({"ok": True, "result": result}).encode())

            def _reply_error(self, exc: _ApiError) -> None:
                body = {"ok": False, "error_code": exc.code, "description": exc.description}
                self._send(exc.code, json.dumps(body).encode())

        return Handler


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # the listen backlog: a real server takes 20 users' connections at once (default 5)


class _ApiError(Exception):
    def __init__(self, code: int, description: str) -> None:
        super().__init__(description)
        self.code, self.description = code, description


def _value(raw: str) -> Any:
    """PTB sends non-string parameters JSON-encoded and strings as they are."""
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def _parse_body(content_type: str, body: bytes) -> tuple[dict[str, Any], dict[str, bytes], dict[str, str]]:
    """Parameters, uploaded files and their file names, from a form or multipart body."""
    if content_type.startswith("multipart/form-data"):
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
            b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + body)
        params: dict[str, Any] = {}
        files: dict[str, bytes] = {}
        filenames: dict[str, str] = {}
        for part in message.iter_parts():
            name = part.get_param("name", header="content-disposition")
            payload = part.get_payload(decode=True) or b""
            if part.get_filename() is not None:
                files[name], filenames[name] = payload, part.get_filename()
            else:
                params[name] = _value(payload.decode())
        return params, files, filenames
    return {k: _value(v) for k, v in parse_qsl(body.decode())}, {}, {}
