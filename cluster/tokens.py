"""Bearer tokens at rest: where a router keeps the token Admin RPCs need, and how token files are written."""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def admin_token_file() -> Path:
    """Where a router without router.auth_token_file keeps the token Admin RPCs need, and where the
    CLI looks for it (read at call time, so HOME decides)."""
    return Path.home() / ".caravan" / "auth_token"


def write_secret(path: Path, text: str) -> str:
    """Makes `path` hold `text`, readable by its owner only from its first byte, unless it already holds
    something (another process won the race): returns what it holds. The text is written to a private
    file first and linked into place, so no reader ever sees a partial or world-readable secret."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    scratch = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(scratch, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        try:
            os.link(scratch, path)
        except FileExistsError:
            if not path.read_text().strip():  # an empty file holds no secret: replace it
                os.replace(scratch, path)
    finally:
        scratch.unlink(missing_ok=True)
    return path.read_text().strip()
