"""Seeded generator of Claude Code-shaped transcript trees for the chaos suite.

Pure and deterministic for a given ``random.Random``: every kind of line the contract names
(turns with string or block content, tool-only and thinking-only messages, progress, system,
summary, unknown types, blank lines, malformed JSON, non-objects, invalid UTF-8, ``\\u0000`` and
lone-surrogate escapes, over-long lines), in the three file layouts (``<uuid>.jsonl``, 2.0.x
``agent-<id>.jsonl`` beside it, 2.1.x ``<uuid>/subagents/agent-<id>.jsonl``).

The generator does not say what a line *is*: the expectation is always computed from the
bytes on disk by :mod:`invariants` (the contract's rule, written independently of the
service's parser), so files mutated by the tests are judged the same way.
"""

from __future__ import annotations

import json
import os
import random
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

_WORDS = (
    "refactor the tailer",
    "why does",
    "exactly once",
    "naïve façade",
    "日本語のテキスト",
    "emoji 🚀✨",
    'quote " and \\ backslash',
    "line\nbreak inside",
    "tab\there",
    "SELECT * FROM events;",
    "{not: json}",
    "ok",
    "Ünïcödé",
)


def rand_uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _iso(at: datetime) -> str:
    return at.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _dumps(obj: Any) -> bytes:
    return (json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n").encode()


@dataclass
class TranscriptFile:
    """One transcript file of the generated tree and the session its lines belong to."""

    path: Path
    session: str
    agent_id: str | None = None  # sub-agent files: lines carry isSidechain + agentId


@dataclass
class TreeGen:
    """Lines and files for a projects tree; see the module docstring."""

    rng: random.Random
    root: Path
    cwd_base: str = "/home/dev/src"
    oversized_every: int = 0  # one over-long line per this many lines (0: never)
    max_line_bytes: int = 64 * 1024
    long_text: float = 0.0  # share of texts of a few KB (tool output pasted into a turn)
    now: datetime = field(default_factory=lambda: datetime.now(UTC))
    files: list[TranscriptFile] = field(default_factory=list)
    _n: int = 0

    # ------------------------------------------------------------------ files
    def new_session_files(self, subagents: bool = True) -> list[TranscriptFile]:
        """A session file, and sometimes sub-agent files of both layouts beside it."""
        rng = self.rng
        project = f"-home-dev-src-proj{rng.randrange(6)}"
        session = rand_uuid(rng)
        folder = self.root / project
        made = [TranscriptFile(folder / f"{session}.jsonl", session)]
        if subagents and rng.random() < 0.35:
            aid = f"{rng.getrandbits(32):08x}"
            made.append(TranscriptFile(folder / f"agent-{aid}.jsonl", session, aid))
        if subagents and rng.random() < 0.35:
            aid = f"a{rng.getrandbits(40):010x}"
            path = folder / session / "subagents" / f"agent-{aid}.jsonl"
            made.append(TranscriptFile(path, session, aid))
        self.files.extend(made)
        return made

    def tree(self, sessions: int) -> list[TranscriptFile]:
        for _ in range(sessions):
            self.new_session_files()
        return self.files

    # ------------------------------------------------------------------ lines
    def line(self, tf: TranscriptFile) -> bytes:
        """One complete line (with its newline) for ``tf``, of a random kind."""
        rng = self.rng
        self._n += 1
        if self.oversized_every and self._n % self.oversized_every == 0:
            return self._oversized(tf)
        r = rng.random()
        if r < 0.30:
            return self._message(tf, "user", self._text())
        if r < 0.55:
            return self._message(tf, "assistant", self._blocks(with_text=True))
        if r < 0.63:
            return self._message(tf, "assistant", self._blocks(with_text=False))
        if r < 0.66:
            return self._message(tf, "user", rng.choice(["", "   ", "\n\t"]))
        if r < 0.69:  # tool results: a user line whose content is a list without text
            blocks = [{"type": "tool_result", "tool_use_id": "t1", "content": self._text()}]
            return self._message(tf, "user", blocks)
        if r < 0.78:
            return self._obj(tf, "progress", data={"type": "hook_progress", "n": rng.random()})
        if r < 0.82:
            return self._obj(tf, "system", subtype="compact_boundary", content=self._text())
        if r < 0.84:
            return _dumps({"type": "summary", "summary": self._text(), "leafUuid": rand_uuid(rng)})
        if r < 0.86:
            return self._obj(tf, "file-history-snapshot", snapshot={"files": {}})
        if r < 0.88:
            return self._obj(tf, f"future-type-{rng.randrange(5)}", data={"x": [1, 2]})
        if r < 0.89:
            return rng.choice([b"\n", b"   \n", b"\t \n"])
        if r < 0.91:
            good = self._message(tf, "user", self._text())
            return good[: rng.randrange(1, len(good) - 2)] + b"\n"  # cut JSON: invalid
        if r < 0.92:
            return rng.choice([b"[1,2,3]\n", b'"just a string"\n', b"42\n", b"null\n"])
        if r < 0.93:
            good = self._message(tf, "user", self._text())
            cut = rng.randrange(2, len(good) - 2)
            return good[:cut] + b"\xff\xfe" + good[cut:]  # invalid UTF-8
        if r < 0.95:  # escapes PostgreSQL cannot store: made storable, still a turn
            esc = rng.choice(["\\u0000", "\\ud800", "\\udfff"])
            body = self._message(tf, "user", "MARK").decode()
            return body.replace("MARK", f"before {esc} after").encode()
        return self._message(tf, "assistant", self._blocks(with_text=True, thinking=True))

    def lines(self, tf: TranscriptFile, n: int) -> bytes:
        return b"".join(self.line(tf) for _ in range(n))

    def _text(self) -> str:
        rng = self.rng
        n = rng.choice([1, 2, 3, 5, 8, 20, 60])
        if self.long_text and rng.random() < self.long_text:
            n = rng.randrange(200, 1200)
        return " ".join(rng.choice(_WORDS) for _ in range(n))

    def _blocks(self, *, with_text: bool, thinking: bool = False) -> list[dict[str, Any]]:
        rng = self.rng
        blocks: list[dict[str, Any]] = []
        if thinking or rng.random() < 0.2:
            blocks.append({"type": "thinking", "thinking": self._text(), "signature": "sig"})
        if with_text:
            blocks.append({"type": "text", "text": self._text()})
            if rng.random() < 0.2:
                blocks.append({"type": "text", "text": " "})
        else:
            if rng.random() < 0.5:
                blocks.append({"type": "text", "text": rng.choice(["", "  ", "\n"])})
            if not blocks or rng.random() < 0.7:
                blocks.append(
                    {"type": "tool_use", "id": "toolu_1", "name": "Bash", "input": {"c": "ls"}}
                )
        return blocks

    def _base(self, tf: TranscriptFile, kind: str) -> dict[str, Any]:
        rng = self.rng
        at = self.now - timedelta(seconds=rng.uniform(0, 900))
        obj: dict[str, Any] = {
            "parentUuid": rand_uuid(rng) if rng.random() < 0.9 else None,
            "isSidechain": tf.agent_id is not None,
            "userType": "external",
            "cwd": f"{self.cwd_base}/{tf.path.parent.name}",
            "sessionId": tf.session,
            "version": "2.1.29",
            "gitBranch": "main",
            "type": kind,
            "uuid": rand_uuid(rng),
            "timestamp": _iso(at),
        }
        if tf.agent_id is not None:
            obj["agentId"] = tf.agent_id
        return obj

    def _message(self, tf: TranscriptFile, kind: str, content: Any) -> bytes:
        obj = self._base(tf, kind)
        message: dict[str, Any] = {"role": "user" if kind == "user" else "assistant"}
        if kind == "assistant":
            message.update(id=f"msg_{self.rng.getrandbits(48):012x}", model="claude-opus-4-5")
            message["usage"] = {"input_tokens": self.rng.randrange(1, 9999), "output_tokens": 7}
        message["content"] = content
        obj["message"] = message
        return _dumps(obj)

    def _obj(self, tf: TranscriptFile, kind: str, **extra: Any) -> bytes:
        obj = self._base(tf, kind)
        obj.update(extra)
        return _dumps(obj)

    def _oversized(self, tf: TranscriptFile) -> bytes:
        pad = "x" * (self.max_line_bytes + self.rng.randrange(1, 4096))
        return self._message(tf, "user", pad)


# ---------------------------------------------------------------------- writing


def append(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


def write_tree(gen: TreeGen, files: list[TranscriptFile], lines_per_file: tuple[int, int]) -> int:
    """Append a random number of lines to each file; return the bytes written."""
    total = 0
    for tf in files:
        data = gen.lines(tf, gen.rng.randint(*lines_per_file))
        append(tf.path, data)
        total += len(data)
    return total


def partial_tail(gen: TreeGen, tf: TranscriptFile) -> bytes:
    """The first part of a line, without its newline: never consumed while incomplete."""
    full = gen._message(tf, "user", "an unfinished line")
    return full[: gen.rng.randrange(1, len(full) - 1)]
