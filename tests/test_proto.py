"""The checked-in gRPC stubs are exactly what grpcio-tools generates from the protos, and the protos
keep the API's conventions (documented fields, UNSPECIFIED enum zeros)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

PROTO_ROOT = Path(__file__).resolve().parents[1] / "proto"
PROTOS = sorted((PROTO_ROOT / "caravan" / "v1").glob("*.proto"))
REGENERATE = ("python -m grpc_tools.protoc -I proto --python_out=proto --pyi_out=proto --grpc_python_out=proto "
              "proto/caravan/v1/*.proto")


def test_checked_in_stubs_match_the_protos(tmp_path):
    from grpc_tools import protoc
    args = ["protoc", f"-I{PROTO_ROOT}", f"--python_out={tmp_path}", f"--pyi_out={tmp_path}",
            f"--grpc_python_out={tmp_path}"] + [str(p) for p in PROTOS]
    assert protoc.main(args) == 0
    generated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert len(generated) == 3 * len(PROTOS)
    for rel in generated:
        checked_in = PROTO_ROOT / rel
        assert checked_in.is_file(), f"{rel} is not checked in; run: {REGENERATE}"
        assert checked_in.read_text() == (tmp_path / rel).read_text(), f"{rel} is stale; run: {REGENERATE}"


@pytest.mark.parametrize("proto", PROTOS, ids=lambda p: p.name)
def test_every_field_is_documented_and_enum_zeros_are_unspecified(proto):
    lines = proto.read_text().splitlines()
    undocumented = []
    for i, line in enumerate(lines):
        field = re.match(r"\s+(optional |repeated )?[\w.]+ (\w+) = \d+;(.*)", line)
        if field and "//" not in field[3] and not lines[i - 1].strip().startswith("//"):
            undocumented.append(field[2])
        enum = re.match(r"\s*enum (\w+) \{", line)
        if enum:
            zero = next(l for l in lines[i + 1:] if re.search(r"= 0;", l))
            prefix = re.sub(r"(?<!^)(?=[A-Z])", "_", enum[1]).upper()
            assert zero.strip().startswith(f"{prefix}_UNSPECIFIED = 0;"), (enum[1], zero)
    assert not undocumented, f"fields without a comment in {proto.name}: {undocumented}"
