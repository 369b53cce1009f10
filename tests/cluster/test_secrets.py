"""Token files: private from their first byte, and one secret however many processes race to create it."""

from __future__ import annotations

import multiprocessing
import stat
from pathlib import Path

from cluster.tokens import write_secret


def test_a_new_secret_is_private_and_an_existing_one_is_kept(tmp_path: Path):
    path = tmp_path / "caravan" / "auth_token"
    assert write_secret(path, "first") == "first"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert write_secret(path, "second") == "first"      # another process's token stays
    path.write_text("")
    assert write_secret(path, "third") == "third"       # an empty file holds no secret
    assert sorted(p.name for p in path.parent.iterdir()) == ["auth_token"]  # no scratch file left


def _create(path: str, text: str, out) -> None:
    out.put(write_secret(Path(path), text))


def test_processes_racing_to_create_it_all_read_the_same_secret(tmp_path: Path):
    path = tmp_path / "auth_token"
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    procs = [ctx.Process(target=_create, args=(str(path), f"token-{i}", out)) for i in range(8)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(10)
    seen = {out.get(timeout=5) for _ in procs}
    assert len(seen) == 1 and seen == {path.read_text()}
