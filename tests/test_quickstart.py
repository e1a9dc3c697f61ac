"""The README's quick start, run literally on a fresh copy of the checkout.

The three commands between ``<!-- quickstart -->`` and ``<!-- /quickstart -->`` in README.md
are read out of the file and run as written (``bash -c``), from the copy's root, as a new
user would: the first (start) in the background as the foreground job of a terminal, the
second (status) until it reports healthy, the third (look at your events) once the tree is
stored. README and test cannot drift apart: editing the block changes what runs.

What the copy is: every file git knows in this checkout (tracked or new, not ignored; their
working-tree content), without ``var/`` or caches, under a HOME whose
``~/.claude/projects`` holds a small tree shaped like Claude Code's. No ``HEADSPACE_*``
variable is set. The one shortcut is the virtualenv: installing it needs the network and
minutes, so the copy's ``.venv`` links to this one's parts and carries the Justfile's
"installed" stamp for its pyproject.toml; ``PYTHONPATH`` makes the copy's own package the
one imported (as the copy's editable install would), so its defaults — ``config.yaml`` and
``var/`` — are the copy's. PATH holds no PostgreSQL: only the embedded server can be used.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import psycopg
import pytest
from watcher_helpers import BASE_TIME, append, assistant, new_uuid, other, user, wait_for

from headspace_watcher.store import embedded as pgserver

REPO = Path(__file__).resolve().parents[1]
VENV = Path(sys.executable).parent.parent
QUICKSTART = re.compile(r"<!-- quickstart -->\s*```sh\n(.*?)```\s*<!-- /quickstart -->", re.S)
FIRST_SCREEN_LINES = 40  # the block must end within the README's first screen
LONG_TEXT = "Refactor the session tracker so that ended sessions are dropped " + "x" * 60 + "TAIL"


@dataclass(frozen=True)
class Checkout:
    root: Path
    home: Path
    env: dict[str, str]

    @property
    def state_dir(self) -> Path:
        return self.root / "var"

    def sh(self, command: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["bash", "-c", command],
            cwd=self.root,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )


def quickstart_commands(readme: str) -> list[str]:
    """The commands of the README's quick-start block (comment and blank lines dropped)."""
    match = QUICKSTART.search(readme)
    assert match, "README.md has no <!-- quickstart --> ```sh … ``` <!-- /quickstart --> block"
    assert readme[: match.end()].count("\n") < FIRST_SCREEN_LINES, "quick start below screen 1"
    lines = [ln.strip() for ln in match.group(1).splitlines()]
    return [ln for ln in lines if ln and not ln.startswith("#")]


def _copy_checkout(dest: Path) -> None:
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for name in filter(None, listed):
        src = REPO / os.fsdecode(name)
        if src.is_file():  # listed but deleted in the working tree: not part of the copy
            (dest / os.fsdecode(name)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / os.fsdecode(name))


def _link_venv(dest: Path) -> None:
    """A ``.venv`` made of links to this one, stamped as installed for the copy's
    pyproject.toml (the Justfile's stamp), so ``just`` installs nothing into either."""
    venv = dest / ".venv"
    venv.mkdir()
    for part in VENV.iterdir():
        if not part.name.startswith(".installed-"):
            (venv / part.name).symlink_to(part)
    digest = hashlib.sha256((dest / "pyproject.toml").read_bytes()).hexdigest()[:16]
    (venv / f".installed-{digest}").touch()


def _tree(home: Path) -> dict[str, str]:
    """A small tree shaped like Claude Code's; returns the session uuid and the turn texts."""
    session = new_uuid()
    folder = home / ".claude" / "projects" / "-home-alice-src-shop"
    at = [BASE_TIME + timedelta(seconds=i) for i in range(10)]
    append(
        folder / f"{session}.jsonl",
        other(session, "summary", at=at[0]),
        user(session, "Why does checkout fail for empty carts?", at=at[1]),
        assistant(session, "The total is divided by the item count; guard for zero.", at=at[2]),
        other(session, "progress", at=at[3]),
        user(session, LONG_TEXT, at=at[4]),
        assistant(session, "Done: ended sessions leave the tracker.", at=at[5]),
    )
    append(
        folder / session / "subagents" / "agent-a1b2c3.jsonl",
        user(session, "Search the repo for divide-by-zero guards", at=at[6], isSidechain=True),
        assistant(session, "Found two guards in cart.py", at=at[7], isSidechain=True),
    )
    return {"session": session, "live": "And one live turn after the start", "long": LONG_TEXT}


@pytest.fixture
def checkout() -> Iterator[Checkout]:
    """World-traversable (PostgreSQL runs as an unprivileged user when we are root)."""
    base = Path(tempfile.mkdtemp(prefix="headspace-quickstart-", dir="/tmp"))
    os.chmod(base, 0o755)
    root, home = base / "checkout", base / "home"
    root.mkdir()
    home.mkdir()
    _copy_checkout(root)
    _link_venv(root)
    just = shutil.which("just")
    assert just, "`just` is a prerequisite (pip install rust-just)"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HEADSPACE_", "PG"))}
    env.update(
        HOME=str(home),
        PWD=str(root),
        PATH=f"{Path(just).parent}:/usr/bin:/bin",  # no PostgreSQL on PATH
        PYTHONPATH=str(root),
    )
    try:
        yield Checkout(root, home, env)
    finally:
        data_dir = Path(os.path.realpath(root / "var" / "pgdata"))
        shutil.rmtree(base, ignore_errors=True)
        if data_dir.name == "pgdata" and not data_dir.is_relative_to(base):
            shutil.rmtree(data_dir.parent, ignore_errors=True)  # relocated under /var/lib


def _turns(state_dir: Path) -> list[str]:
    url = pgserver.embedded_url(state_dir).replace("postgresql+psycopg", "postgresql")
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT payload->>'text' FROM events WHERE event_type = 'turn_detected'"
        ).fetchall()
    return [text for (text,) in rows]


def _stop_like_ctrl_c(start: subprocess.Popen[bytes], checkout: Checkout) -> None:
    """SIGINT to the foreground job's process group, as a terminal's Ctrl-C does. Whatever
    is still alive afterwards is killed (circus's children run in their own sessions, so a
    circusd that did not stop them leaves them behind): a failing test leaks no process."""
    os.killpg(start.pid, signal.SIGINT)
    try:
        start.wait(timeout=60)
    finally:
        if start.poll() is None:
            os.killpg(start.pid, signal.SIGKILL)
            start.wait(timeout=30)
        postmaster = checkout.state_dir / "pgdata" / "postmaster.pid"
        for pid_file, sig in (
            (checkout.state_dir / "headspace-watcher.pid", signal.SIGKILL),
            (postmaster, signal.SIGQUIT),
        ):
            pid = _pid_in(pid_file)
            if pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
        wait_for(lambda: not postmaster.exists(), "the embedded PostgreSQL stopped", timeout=30)


def _pid_in(pid_file: Path) -> int | None:
    try:
        return int(pid_file.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def test_readme_first_screen_runs_literally_on_a_fresh_checkout(checkout: Checkout) -> None:
    start_cmd, status_cmd, look_cmd = quickstart_commands((checkout.root / "README.md").read_text())
    tree = _tree(checkout.home)
    session = tree["session"]
    log_path = checkout.root.parent / "start.log"

    with log_path.open("wb") as log:
        start = subprocess.Popen(
            ["bash", "-c", start_cmd],
            cwd=checkout.root,
            env=checkout.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    outputs: list[str] = []
    try:

        def status_healthy() -> subprocess.CompletedProcess[str] | None:
            assert start.poll() is None, log_path.read_text(errors="replace")
            result = checkout.sh(status_cmd)
            outputs.append(result.stdout + result.stderr)
            return result if result.returncode == 0 else None

        status = wait_for(
            status_healthy, f"`{status_cmd}` exit 0", timeout=180, details=lambda: outputs[-1]
        )
        assert re.search(r"state: healthy", status.stdout), status.stdout
        assert "headspace-watcher: active" in status.stdout, status.stdout

        wait_for(lambda: len(_turns(checkout.state_dir)) == 6, "the tree's 6 turns", timeout=60)
        main = checkout.home / ".claude/projects/-home-alice-src-shop" / f"{session}.jsonl"
        append(main, assistant(session, tree["live"], at=BASE_TIME + timedelta(seconds=30)))
        wait_for(lambda: len(_turns(checkout.state_dir)) == 7, "the live append", timeout=30)

        look = checkout.sh(look_cmd)
        outputs.append(look.stdout + look.stderr)
    finally:
        _stop_like_ctrl_c(start, checkout)

    after = checkout.sh(status_cmd)
    assert "state: stopped" in after.stdout and after.returncode != 0, after.stdout
    secrets = [
        (checkout.state_dir / "pg" / name).read_text().strip()
        for name in ("password", "service-password")
    ]
    logs = [log_path, *(checkout.state_dir / "log").glob("*.log")]
    texts = [*outputs, after.stdout, *(p.read_text(errors="replace") for p in logs)]
    for secret in secrets:
        assert all(secret not in text for text in texts)

    # Waits for `headspace-watcher psql` (issue 11, item 1): until it exists this fails here.
    assert look.returncode == 0, look.stdout + look.stderr
    first_lines = look.stdout.splitlines()[:3]
    assert re.search(r"\btime\b.*\bactor\b.*\btext\b", "\n".join(first_lines)), look.stdout
    assert tree["live"] in look.stdout  # the newest turn
    assert "Found two guards in cart.py" in look.stdout  # a sub-agent's turn
    assert re.search(r"\|\s*user\s*\|", look.stdout) and re.search(r"\|\s*agent\s*\|", look.stdout)
    assert tree["long"][:80] in look.stdout and "TAIL" not in look.stdout  # first 80 chars
    assert "(7 rows)" in look.stdout
