"""Bridge Twilio phone calls to AssemblyAI's Voice Agent API.

A caller dials your Twilio number; Twilio asks this server for instructions (a webhook), gets
TwiML that connects the call to a Media Stream, and streams the caller's audio here over a
WebSocket. This server relays it, untouched, to the Voice Agent API over a second WebSocket and
plays the agent's voice back. Both sides speak G.711 mu-law at 8 kHz, so nothing is transcoded.

    python bridge.py                    serve calls on PORT (default 8080)
    python bridge.py call +15551234567  have the agent call someone (needs TWILIO_* settings)

Settings come from the environment or a .env file: see .env.example and README.md.
"""

import asyncio
import base64
import errno
import inspect
import json
import logging
import os
import random
import re
import signal
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from contextlib import suppress
from dataclasses import dataclass, field
from functools import partial
from xml.sax.saxutils import quoteattr

from dotenv import load_dotenv
from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI
from websockets.http11 import Request, Response

load_dotenv()

# --------------------------------------------------------------------------- settings

ASSEMBLYAI_API_KEY = os.environ.get("ASSEMBLYAI_API_KEY", "")  # required to serve calls
VOICE_AGENT_URL = os.environ.get("VOICE_AGENT_URL") or "wss://agents.assemblyai.com/v1/ws"
PORT = os.environ.get("PORT") or "8080"  # the one port for webhooks and Media Streams
PUBLIC_URL = os.environ.get("PUBLIC_URL", "").rstrip("/")  # https://abc.ngrok.app; unset: Host
AGENT_VOICE = os.environ.get("AGENT_VOICE", "")  # lowercase voice name; unset: server default
TWILIO_ACCOUNT_SID = os.environ.get("TWILIO_ACCOUNT_SID", "")  # outbound calls only
TWILIO_AUTH_TOKEN = os.environ.get("TWILIO_AUTH_TOKEN", "")  # outbound calls only
TWILIO_PHONE_NUMBER = os.environ.get("TWILIO_PHONE_NUMBER", "")  # caller ID for outbound calls
TWILIO_API_URL = os.environ.get("TWILIO_API_URL") or "https://api.twilio.com"
LOG_LEVEL = os.environ.get("LOG_LEVEL") or "INFO"

NGROK_API = "http://127.0.0.1:4040/api/tunnels"  # the local ngrok agent, asked for its URL
MAX_TWILIO_MESSAGE = 2**16  # bytes; Twilio's largest message, `start`, is far smaller
MAX_REQUEST_HEAD = 2**14  # bytes of HTTP request line and headers
MAX_WEBHOOK_BODY = 2**16  # bytes; Twilio's form posts are a few hundred bytes
HANDSHAKE_TIMEOUT = 10  # seconds for a whole HTTP request (head and body) to arrive
START_TIMEOUT = 10  # seconds for Twilio's `start` message after the stream opens
AGENT_OPEN_TIMEOUT = 10  # seconds to open the Voice Agent API WebSocket

log = logging.getLogger("bridge")

# --------------------------------------------------------------------------- the agent

SYSTEM_PROMPT = """\
You are a friendly, concise voice assistant answering a phone call. Speak naturally, in short
sentences: the caller hears you and cannot see text, so never use lists, markdown or emoji.
If the caller asks for a random number, use the generate_random_number tool."""

# Inbound and outbound calls share every line of code; they differ only in this data: the
# Media Stream path their TwiML points at, and what the agent says first.
GREETINGS = {
    "/stream": "Hi, thanks for calling! How can I help you today?",
    "/outbound-stream": "Hi, this is your AI assistant calling. Do you have a minute?",
}


def generate_random_number(min: int, max: int) -> int:
    """Pick a random whole number between min and max, inclusive."""
    return random.randint(min, max)


# Tools the agent may call: name -> what the model reads, and the function that runs. The
# function gets the model's arguments as keywords, may be plain or async, and returns anything
# JSON can encode; an exception it raises is reported to the agent as a failed tool call.
TOOLS = {
    "generate_random_number": {
        "description": "Generate a random whole number between min and max, inclusive.",
        "parameters": {
            "type": "object",
            "properties": {
                "min": {"type": "integer", "description": "The smallest allowed number."},
                "max": {"type": "integer", "description": "The largest allowed number."},
            },
            "required": ["min", "max"],
        },
        "function": generate_random_number,
    },
}

# A session.error code that usually means a setting is wrong, and what to check.
ERROR_HINTS = {
    "unauthorized": "check ASSEMBLYAI_API_KEY",
    "invalid_value": "check AGENT_VOICE: voice names are lowercase",
}

# --------------------------------------------------------------------------- the two protocols
# Small pure functions that build each message one side sends to the other. The two audio
# messages go out 50 times a second each way on every call, so they are put together around
# the payload (escaped by json.dumps) instead of encoding a whole dict: five times faster.


def session_update(greeting: str) -> dict:
    """The first message to the agent: prompt, greeting, tools, and mu-law audio both ways."""
    output = {"format": {"encoding": "audio/pcmu"}}
    if AGENT_VOICE:
        output["voice"] = AGENT_VOICE
    tools = [
        {"type": "function", "name": name, "description": tool["description"],
         "parameters": tool["parameters"]}
        for name, tool in TOOLS.items()
    ]
    return {"type": "session.update", "session": {
        "system_prompt": SYSTEM_PROMPT,
        "greeting": greeting,
        "input": {"format": {"encoding": "audio/pcmu"}},
        "output": output,
        "tools": tools,
    }}


def agent_audio(payload: str) -> str:
    """An input.audio message carrying Twilio's base64 mu-law exactly as it arrived."""
    return '{"type": "input.audio", "audio": ' + json.dumps(payload) + "}"


def twilio_media(stream_sid: str, payload: str) -> str:
    """A Twilio media message carrying the agent's base64 mu-law exactly as it arrived."""
    return ('{"event": "media", "streamSid": ' + json.dumps(stream_sid)
            + ', "media": {"payload": ' + json.dumps(payload) + "}}")


def twilio_clear(stream_sid: str) -> str:
    """A Twilio clear message: drop the agent audio Twilio has buffered but not yet played."""
    return json.dumps({"event": "clear", "streamSid": stream_sid})


def tool_result(call_id: str, result: object, is_error: bool = False) -> str:
    """A tool.result message; the protocol wants `result` as a JSON string."""
    return json.dumps({"type": "tool.result", "call_id": call_id,
                       "result": json.dumps(result), "is_error": is_error})


# --------------------------------------------------------------------------- one call


class CallLog(logging.LoggerAdapter):
    """Tag every line with the CallSid it belongs to."""

    def process(self, msg, kwargs):
        return f"[{self.extra['call_sid']}] {msg}", kwargs


@dataclass
class Call:
    """Everything one phone call needs, passed explicitly to every handler."""

    sid: str  # Twilio's CallSid: tags every log line
    stream_sid: str  # addresses every message we send Twilio
    twilio: ServerConnection
    agent: ClientConnection | None = None
    ready: bool = False  # session.ready arrived: the caller's audio flows from now on
    reply_id: str = ""  # the agent reply now being spoken
    replies: int = 0  # replies started so far, to name any the server leaves unnamed
    interrupted: set[str] = field(default_factory=set)  # replies whose late audio we drop
    last_event: str = ""  # latest of reply.started, input.speech.started, reply.done
    results: list[str] = field(default_factory=list)  # tool.result messages waiting to go
    tool_tasks: set[asyncio.Task] = field(default_factory=set)  # tools still running
    started: float = field(default_factory=time.monotonic)
    frames_in: int = 0  # caller audio frames sent to the agent
    frames_out: int = 0  # agent audio frames sent to the caller
    barge_ins: int = 0  # agent replies the caller interrupted
    tool_calls: int = 0
    malformed: int = 0  # messages from either side we could not use

    def __post_init__(self):
        self.log = CallLog(log, {"call_sid": self.sid})

    def summary(self) -> str:
        seconds = time.monotonic() - self.started
        return (f"call ended after {seconds:.1f} s: audio frames {self.frames_in} in, "
                f"{self.frames_out} out; barge-ins {self.barge_ins}; tool calls "
                f"{self.tool_calls}; malformed messages {self.malformed}")


def parse_event(call: Call, message: str | bytes, sender: str) -> dict | None:
    """Decode one JSON message; log the first undecodable one of a call and count the rest."""
    with suppress(ValueError):
        event = json.loads(message) if isinstance(message, str) else None
        if isinstance(event, dict):
            return event
    note_malformed(call, sender, repr(message[:80]))
    return None


def note_malformed(call: Call, sender: str, what: str) -> None:
    """Count a message we could not use; only the first of each call gets a log line."""
    call.malformed += 1
    if call.malformed == 1:
        call.log.warning("ignoring a malformed message from %s (later ones are only counted): %s",
                         sender, what)


# --- Twilio -> agent. Each handler returns True when its side has ended the call.


async def on_media(call: Call, event: dict) -> None:
    # Audio sent before session.ready is discarded by the agent, so it is not sent at all.
    if call.ready:
        call.frames_in += 1
        await call.agent.send(agent_audio(event["media"]["payload"]))


async def on_dtmf(call: Call, event: dict) -> None:
    call.log.info("caller pressed %s", event["dtmf"]["digit"])


async def on_stop(call: Call, event: dict) -> bool:
    call.log.info("Twilio stopped the stream: the caller hung up")
    return True


TWILIO_EVENTS = {"media": on_media, "dtmf": on_dtmf, "stop": on_stop}


# --- agent -> Twilio


async def on_session_ready(call: Call, event: dict) -> None:
    call.ready = True
    call.log.info("agent session %s ready", event.get("session_id"))


async def on_reply_started(call: Call, event: dict) -> None:
    call.last_event = "reply.started"
    call.replies += 1
    call.reply_id = event.get("reply_id") or f"reply-{call.replies}"


async def on_reply_audio(call: Call, event: dict) -> None:
    if (event.get("reply_id") or call.reply_id) in call.interrupted:
        return  # the tail of a reply the caller talked over: never play it
    call.frames_out += 1
    await call.twilio.send(twilio_media(call.stream_sid, event["data"]))


async def on_speech_started(call: Call, event: dict) -> None:
    # The caller started talking: stop the agent's voice at once rather than let Twilio play
    # out what it has buffered. If this was only an "uh-huh", the reply's next audio follows.
    call.last_event = "input.speech.started"
    await call.twilio.send(twilio_clear(call.stream_sid))


async def on_reply_done(call: Call, event: dict) -> None:
    call.last_event = "reply.done"
    if event.get("status") == "interrupted":
        call.barge_ins += 1
        call.interrupted.add(event.get("reply_id") or call.reply_id)
        await call.twilio.send(twilio_clear(call.stream_sid))
        if call.results:
            call.log.info("discarding %d tool results: the caller interrupted", len(call.results))
            call.results.clear()
    await send_tool_results(call)


async def on_transcript_user(call: Call, event: dict) -> None:
    call.log.info("caller: %s", event.get("text", ""))


async def on_transcript_agent(call: Call, event: dict) -> None:
    cut = " [interrupted]" if event.get("interrupted") else ""
    call.log.info("agent: %s%s", event.get("text", ""), cut)


async def on_session_error(call: Call, event: dict) -> None:
    code = event.get("code", "unknown")
    hint = f" ({ERROR_HINTS[code]})" if code in ERROR_HINTS else ""
    call.log.warning("agent error %s: %s%s", code, event.get("message", ""), hint)


async def on_session_ended(call: Call, event: dict) -> bool:
    call.log.info("agent session ended")
    return True


# --- tools


async def on_tool_call(call: Call, event: dict) -> None:
    # Run the tool in its own task so that audio keeps flowing both ways while it works.
    call.tool_calls += 1
    task = asyncio.create_task(run_tool(call, event["call_id"], event.get("name"),
                                        event.get("arguments") or {}, call.reply_id))
    call.tool_tasks.add(task)
    task.add_done_callback(call.tool_tasks.discard)


async def run_tool(call: Call, call_id: str, name: str, arguments: dict, reply_id: str) -> None:
    """Run one tool and queue exactly one tool.result for it, unless its reply was cut off."""
    tool = TOOLS.get(name)
    try:
        if tool is None:
            raise LookupError(f"there is no tool named {name!r}")
        function = tool["function"]
        if inspect.iscoroutinefunction(function):
            value = await function(**arguments)
        else:  # a plain function runs in a thread so that it cannot stall the audio
            value = await asyncio.to_thread(function, **arguments)
        message = tool_result(call_id, value)
        call.log.info("tool %s(%s) -> %s", name, arguments, value)
    except Exception as exc:  # the tool's own bug or bad arguments: tell the agent, go on
        message = tool_result(call_id, {"error": f"{type(exc).__name__}: {exc}"}, is_error=True)
        call.log.warning("tool %s(%s) failed: %s: %s", name, arguments, type(exc).__name__, exc)
    if reply_id in call.interrupted:
        call.log.info("discarding the result of %s: the caller interrupted", name)
        return
    call.results.append(message)
    with suppress(ConnectionClosed):  # the call ended while the tool ran
        await send_tool_results(call)


async def send_tool_results(call: Call) -> None:
    """Send finished tool results, but only while reply.done is the latest turn event.

    The Voice Agent API's timing rule: not earlier, while the agent is still speaking its
    filler phrase; not after reply.started or input.speech.started, when a new turn has begun.
    """
    while call.results and call.last_event == "reply.done":
        await call.agent.send(call.results.pop(0))


AGENT_EVENTS = {
    "session.ready": on_session_ready,
    "reply.started": on_reply_started,
    "reply.audio": on_reply_audio,
    "input.speech.started": on_speech_started,
    "reply.done": on_reply_done,
    "transcript.user": on_transcript_user,
    "transcript.agent": on_transcript_agent,
    "tool.call": on_tool_call,
    "session.error": on_session_error,
    "error": on_session_error,  # older servers named it so
    "session.ended": on_session_ended,
}


# --- the call itself


async def relay(call: Call, source, handlers: dict, key: str, sender: str) -> None:
    """Hand every event from one side to its handler, until that side ends the call."""
    with suppress(ConnectionClosed):  # either socket closing ends the call; so does `stop`
        async for message in source:
            event = parse_event(call, message, sender)
            handler = handlers.get(event.get(key)) if event else None
            if handler is None:
                continue  # events we have no use for; both protocols add new ones over time
            try:
                if await handler(call, event):
                    return
            except (KeyError, TypeError, AttributeError) as exc:
                note_malformed(call, sender, f"{event[key]}: {type(exc).__name__} {exc}")


async def relay_both_ways(call: Call) -> None:
    """Relay until either side ends the call, then end the other side too."""
    caller_to_agent = asyncio.create_task(
        relay(call, call.twilio, TWILIO_EVENTS, "event", "Twilio"))
    agent_to_caller = asyncio.create_task(
        relay(call, call.agent, AGENT_EVENTS, "type", "the agent"))
    both = {caller_to_agent, agent_to_caller}
    try:
        done, _ = await asyncio.wait(both, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in both:
            task.cancel()
        await asyncio.wait(both)
    for task in done:
        task.result()  # a bug in a handler surfaces here, so websockets logs it
    if caller_to_agent in done:
        # End the agent session now: without session.end it lingers, billed, for 30 s.
        with suppress(ConnectionClosed):
            await call.agent.send(json.dumps({"type": "session.end"}))
    if call.agent.close_code not in (None, 1000):
        call.log.warning("the Voice Agent API closed the connection: %s %s",
                         call.agent.close_code, call.agent.close_reason)


async def wait_for_start(twilio: ServerConnection) -> Call | None:
    """Read Twilio's messages up to `start` and return the new call; None if none comes."""
    try:
        async with asyncio.timeout(START_TIMEOUT):
            async for message in twilio:
                with suppress(ValueError, KeyError, TypeError):
                    event = json.loads(message)
                    if event["event"] == "start":
                        start = event["start"]
                        return Call(sid=start["callSid"], stream_sid=start["streamSid"],
                                    twilio=twilio)
    except TimeoutError:
        log.warning("a Media Stream sent no start message in %d s: closing it", START_TIMEOUT)
    except ConnectionClosed:
        pass
    return None


async def connect_agent(call: Call) -> ClientConnection | None:
    """Open the Voice Agent API WebSocket for one call; log plainly why if it cannot be done."""
    try:
        return await connect(VOICE_AGENT_URL, compression=None, open_timeout=AGENT_OPEN_TIMEOUT,
                             additional_headers={"Authorization": f"Bearer {ASSEMBLYAI_API_KEY}"})
    except InvalidStatus as exc:
        status = exc.response.status_code
        hint = f" ({ERROR_HINTS['unauthorized']})" if status in (401, 403) else ""
        call.log.error("the Voice Agent API refused the connection: HTTP %d%s", status, hint)
    except (OSError, TimeoutError, InvalidHandshake, InvalidURI) as exc:
        call.log.error("cannot reach the Voice Agent API at %s: %s (check VOICE_AGENT_URL "
                       "and your network)", VOICE_AGENT_URL, exc or type(exc).__name__)
    return None


async def media_stream(twilio: ServerConnection) -> None:
    """Carry one phone call, from Twilio's `start` to hang-up."""
    call = await wait_for_start(twilio)
    if call is None:
        return
    path = urllib.parse.urlsplit(twilio.request.path).path
    call.log.info("call connected on %s", path)
    call.agent = await connect_agent(call)
    if call.agent is None:
        return  # returning closes the Twilio stream, and the call's TwiML hangs up
    try:
        await call.agent.send(json.dumps(session_update(GREETINGS[path])))
        await relay_both_ways(call)
    finally:
        for task in call.tool_tasks:
            task.cancel()
        await call.agent.close()
        call.log.info(call.summary())


# --------------------------------------------------------------------------- HTTP webhooks


class WebhookConnection(ServerConnection):
    """A server connection that also takes the form body of Twilio's webhook POSTs.

    websockets reads only the head of an HTTP request, and closes a request that has a body
    without answering it. This takes the body off the wire first, keeps it parsed in
    self.form, and hands websockets the head alone. Once the head is through, every byte
    goes straight to websockets.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.form: list[tuple[str, str]] = []  # the POSTed fields, in order
        self.pending: bytearray | None = bytearray()  # the request so far; None once passed on

    def data_received(self, data: bytes) -> None:
        if self.pending is None:
            return super().data_received(data)
        self.pending += data
        head_end = self.pending.find(b"\r\n\r\n")
        if head_end < 0:  # the head is not complete yet
            if len(self.pending) > MAX_REQUEST_HEAD:
                self.refuse("431 Request Header Fields Too Large")
            return
        head, rest = bytes(self.pending[:head_end + 4]), self.pending[head_end + 4:]
        if re.search(rb"\r\ntransfer-encoding:", head, re.IGNORECASE):
            return self.refuse("411 Length Required")
        match = re.search(rb"\r\ncontent-length:[ \t]*(\d+)[ \t]*\r\n", head, re.IGNORECASE)
        length = int(match[1]) if match else 0
        if length > MAX_WEBHOOK_BODY:
            return self.refuse("413 Content Too Large")
        if len(rest) < length:
            return  # wait for the rest of the body; HANDSHAKE_TIMEOUT bounds the wait
        self.form = urllib.parse.parse_qsl(rest[:length].decode("utf-8", "replace"),
                                           keep_blank_values=True)
        self.pending = None
        head = re.sub(rb"(?i)\r\ncontent-length:[^\r\n]*", b"", head)
        super().data_received(head + rest[length:])

    def refuse(self, status: str) -> None:
        self.pending = bytearray()
        self.transport.write(f"HTTP/1.1 {status}\r\nContent-Length: 0\r\n"
                             "Connection: close\r\n\r\n".encode())
        self.transport.close()


def respond(connection: ServerConnection, status: int, body: str, content_type: str) -> Response:
    """A plain HTTP response with the given content type."""
    response = connection.respond(status, body)
    del response.headers["Content-Type"]  # respond() sets text/plain; assigning would add a copy
    response.headers["Content-Type"] = content_type
    return response


def public_base_url(request: Request) -> str | None:
    """The https URL Twilio reaches this server at: PUBLIC_URL, else the request's Host."""
    if PUBLIC_URL:
        return PUBLIC_URL
    host = request.headers.get("Host")
    return f"https://{host}" if host else None


def connect_twiml(stream_url: str) -> str:
    """TwiML that connects the call to a Media Stream, and hangs up when the stream ends."""
    return ('<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<Response><Connect><Stream url={quoteattr(stream_url)}/></Connect>"
            "<Hangup/></Response>")


def answer_call(connection: ServerConnection, request: Request, form: dict, *, stream: str):
    """Answer Twilio's call webhook: connect the call to our Media Stream at `stream`."""
    base = public_base_url(request)
    if base is None:
        return connection.respond(400, "No Host header: set PUBLIC_URL.\n")
    log.info("[%s] %s call from %s to %s", form.get("CallSid", "?"),
             form.get("Direction", "incoming"), form.get("From", "?"), form.get("To", "?"))
    ws_base = "ws" + base.removeprefix("http")  # https://host -> wss://host
    return respond(connection, 200, connect_twiml(ws_base + stream), "text/xml")


def call_status(connection: ServerConnection, request: Request, form: dict) -> Response:
    """Log Twilio's call progress callbacks: one line each."""
    duration = f" after {form['CallDuration']} s" if form.get("CallDuration") else ""
    log.info("[%s] call %s%s", form.get("CallSid", "?"), form.get("CallStatus", "?"), duration)
    return respond(connection, 200, "", "text/plain")


def health(connection: ServerConnection, request: Request, form: dict) -> Response:
    """Tell a load balancer or uptime check that the server is up."""
    return connection.respond(200, "OK\n")


WEBHOOKS = {
    "/twiml": partial(answer_call, stream="/stream"),
    "/outbound-twiml": partial(answer_call, stream="/outbound-stream"),
    "/call-status": call_status,
    "/health": health,
}


def process_request(connection: WebhookConnection, request: Request) -> Response | None:
    """Answer the plain HTTP webhooks; let Media Stream upgrades through to media_stream()."""
    url = urllib.parse.urlsplit(request.path)
    if url.path in GREETINGS:
        return None  # a Media Stream: go on with the WebSocket handshake
    webhook = WEBHOOKS.get(url.path)
    if webhook is None:
        return connection.respond(404, "Not Found\n")
    if request.method not in ("GET", "POST"):
        return connection.respond(405, "Method Not Allowed\n")
    # Twilio sends its fields in a POST's body, or in the query string of a GET.
    form = connection.form or urllib.parse.parse_qsl(url.query, keep_blank_values=True)
    return webhook(connection, request, dict(form))


def serve_bridge(host: str | None, port: int):
    """Start the server: webhooks over plain HTTP, Media Streams over WebSocket, one port."""
    return serve(media_stream, host, port, process_request=process_request,
                 create_connection=WebhookConnection, compression=None,
                 max_size=MAX_TWILIO_MESSAGE, open_timeout=HANDSHAKE_TIMEOUT)


# --------------------------------------------------------------------------- outbound calls


def ngrok_url() -> str:
    """The https URL of the local ngrok agent's tunnel, or "" if there is none."""
    try:
        with urllib.request.urlopen(NGROK_API, timeout=2) as response:
            tunnels = json.load(response)["tunnels"]
        return next(t["public_url"] for t in tunnels if t["public_url"].startswith("https://"))
    except (OSError, ValueError, KeyError, TypeError, StopIteration):
        return ""


def twilio_error(error: urllib.error.HTTPError) -> str:
    """Twilio's own words for a refused request: its error code and message."""
    try:
        body = json.load(error)
        words = " ".join(str(body[key]) for key in ("code", "message") if body.get(key))
    except (ValueError, AttributeError):
        words = ""
    hint = " (check TWILIO_ACCOUNT_SID and TWILIO_AUTH_TOKEN)" if error.code == 401 else ""
    return (words or f"HTTP {error.code}") + hint


def place_call(to: str) -> str:
    """Have Twilio call `to` and connect the answered call to the agent; return its Call SID."""
    needed = {"TWILIO_ACCOUNT_SID": TWILIO_ACCOUNT_SID, "TWILIO_AUTH_TOKEN": TWILIO_AUTH_TOKEN,
              "TWILIO_PHONE_NUMBER": TWILIO_PHONE_NUMBER}
    missing = [name for name, value in needed.items() if not value]
    if missing:
        raise SystemExit(f"cannot place a call: set {', '.join(missing)} (see .env.example)")
    base = PUBLIC_URL or ngrok_url()
    if not base:
        raise SystemExit("cannot place a call: set PUBLIC_URL, or start ngrok "
                         f"(ngrok http {PORT})")
    form = [("To", to), ("From", TWILIO_PHONE_NUMBER), ("Url", f"{base}/outbound-twiml"),
            ("StatusCallback", f"{base}/call-status")]
    form += [("StatusCallbackEvent", e) for e in ("initiated", "ringing", "answered", "completed")]
    credentials = base64.b64encode(f"{TWILIO_ACCOUNT_SID}:{TWILIO_AUTH_TOKEN}".encode()).decode()
    request = urllib.request.Request(
        f"{TWILIO_API_URL}/2010-04-01/Accounts/{TWILIO_ACCOUNT_SID}/Calls.json",
        data=urllib.parse.urlencode(form).encode(),
        headers={"Authorization": f"Basic {credentials}"})
    try:
        with urllib.request.urlopen(request, timeout=15) as response:
            return json.load(response)["sid"]
    except urllib.error.HTTPError as exc:
        raise SystemExit(f"Twilio refused the call: {twilio_error(exc)}") from None
    except (OSError, ValueError, KeyError) as exc:
        raise SystemExit(f"cannot reach Twilio at {TWILIO_API_URL}: {exc}") from None


# --------------------------------------------------------------------------- main


async def serve_calls(port: int) -> None:
    """Serve until SIGTERM or Ctrl-C."""
    try:
        server = await serve_bridge(None, port)
    except OSError as exc:
        reason = "another program uses it" if exc.errno == errno.EADDRINUSE else exc.strerror
        message = f"cannot listen on port {port}: {reason} (set PORT to a free port)"
        raise SystemExit(message) from None
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, server.close)
    where = PUBLIC_URL or "https://<your ngrok host>"
    log.info("listening on port %d; set your Twilio number's voice webhook to %s/twiml",
             port, where)
    await server.wait_closed()


def main(argv: list[str]) -> None:
    """Check the settings, then serve calls, or place one."""
    level = logging.getLevelName(LOG_LEVEL.upper())
    if not isinstance(level, int):
        raise SystemExit(f"LOG_LEVEL={LOG_LEVEL} is not a level: use DEBUG, INFO or WARNING")
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("websockets").setLevel(logging.WARNING)  # its INFO lines repeat ours
    if len(argv) == 2 and argv[0] == "call":
        print(place_call(argv[1]))
        return
    if argv:
        raise SystemExit("usage: python bridge.py [call +15551234567]")
    if not ASSEMBLYAI_API_KEY:
        raise SystemExit("ASSEMBLYAI_API_KEY is not set: copy .env.example to .env and fill it in")
    if not PORT.isdigit() or not 0 < int(PORT) < 65536:
        raise SystemExit(f"PORT={PORT} is not a port number (1-65535)")
    if PUBLIC_URL and not PUBLIC_URL.startswith(("https://", "http://")):
        raise SystemExit(f"PUBLIC_URL={PUBLIC_URL} must start with https://")
    asyncio.run(serve_calls(int(PORT)))


if __name__ == "__main__":
    main(sys.argv[1:])
