"""Signatures made by other implementations (openssl, Node.js) verify with ours, and ours with theirs.

Node builds the canonical JSON itself from the decision object, so these tests also prove that a
producer in another language derives the same bytes. Needs ``openssl`` (3.0 or later, for
``pkeyutl -rawin``) and ``node`` on the PATH: missing, they skip the tests, or fail them with CI=true.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from infra.credentials.signing import (
    canonical_bytes,
    generate_keypair,
    load_private_key,
    parse_public_key,
    public_key_text,
    sign,
    verify,
    verify_signed,
)
from tests import signing_doc
from tests.services import unavailable

TIMEOUT = 30  # seconds for one openssl or node run; each takes well under one

# Node's own canonical form and signing, written independently of the documented snippet:
# sorted names, each member through JSON.stringify, joined without whitespace.
NODE_SIGN = r"""
const crypto = require("node:crypto");
const input = JSON.parse(require("node:fs").readFileSync(0, "utf8"));
const names = Object.keys(input.decision).filter((n) => n !== "signature").sort();
const text = "{" + names.map((n) => JSON.stringify(n) + ":" + JSON.stringify(input.decision[n])).join(",") + "}";
const data = Buffer.from(text, "utf8");
const signature = crypto.sign(null, data, crypto.createPrivateKey(input.private_key_pem));
process.stdout.write(JSON.stringify({ canonical: data.toString("base64"), value: signature.toString("base64") }));
"""

# Node verifies a message we signed, with the key as the raw 32 bytes of our key text.
NODE_VERIFY = r"""
const crypto = require("node:crypto");
const input = JSON.parse(require("node:fs").readFileSync(0, "utf8"));
const raw = Buffer.from(input.public_key.slice("ed25519:".length), "base64");
const spki = Buffer.concat([Buffer.from("302a300506032b6570032100", "hex"), raw]);
const key = crypto.createPublicKey({ key: spki, format: "der", type: "spki" });
const names = Object.keys(input.message).filter((n) => n !== "signature").sort();
const text = "{" + names.map((n) => JSON.stringify(n) + ":" + JSON.stringify(input.message[n])).join(",") + "}";
const ok = crypto.verify(null, Buffer.from(text, "utf8"), key, Buffer.from(input.message.signature.value, "base64"));
process.stdout.write(ok ? "valid" : "invalid");
"""

REASONS = {
    "ascii": "Partner contract signed.",
    "non_ascii_and_a_newline": "d\u00e9j\u00e0 vu \u2713\nand a second line",
    "astral_and_controls": 'Emoji \U0001f680, tab\t, quote ", backslash \\, unit separator \x1f, DEL \x7f.',
}


def a_decision(reason: str) -> dict[str, Any]:
    return {
        "version": 2,
        "type": "access_request.decided",
        "decision_id": str(uuid.uuid4()),
        "request_id": str(uuid.uuid4()),
        "decision": "approve",
        "admin_id": "dana",
        "reason": reason,
        "decided_at": "2026-11-27T10:00:00Z",
        "audience": "accessflow",
    }


def run(argv: list[str], *, cwd: Path | None = None, stdin: bytes | None = None) -> bytes:
    result = subprocess.run(argv, cwd=cwd, input=stdin, capture_output=True, timeout=TIMEOUT, check=False)
    assert result.returncode == 0, f"{argv[0]} failed: {result.stderr.decode(errors='replace')}"
    return result.stdout


@pytest.fixture(scope="module")
def openssl() -> str:
    path = shutil.which("openssl")
    if path is None:
        unavailable("openssl is not on the PATH")
        return ""
    version = run([path, "version"]).decode()
    match = re.match(r"OpenSSL (\d+)\.", version)
    if not match or int(match.group(1)) < 3:
        unavailable(f"OpenSSL 3.0 or later is needed for `pkeyutl -rawin`; found {version.strip()}")
    return path


@pytest.fixture(scope="module")
def node() -> str:
    path = shutil.which("node")
    if path is None:
        unavailable("node is not on the PATH")
        return ""
    return path


def node_json(node: str, script: str, payload: dict[str, Any]) -> Any:
    return json.loads(run([node, "-e", script], stdin=json.dumps(payload).encode()))


class TestOpenssl:
    def test_an_openssl_signature_of_our_canonical_bytes_verifies(self, openssl: str, tmp_path: Path) -> None:
        # Given a key openssl generated, its public key as openssl writes it, and our canonical bytes
        run([openssl, "genpkey", "-algorithm", "ed25519", "-out", "key.pem"], cwd=tmp_path)
        public_pem = run([openssl, "pkey", "-in", "key.pem", "-pubout"], cwd=tmp_path).decode()
        decision = a_decision(REASONS["non_ascii_and_a_newline"])
        data = canonical_bytes(decision)
        (tmp_path / "data").write_bytes(data)

        # When openssl signs those bytes
        signature = run(
            [openssl, "pkeyutl", "-sign", "-rawin", "-inkey", "key.pem", "-in", "data"], cwd=tmp_path
        )
        value = base64.b64encode(signature).decode()

        # Then our verify accepts it, under the PEM and under our key text, and refuses tampering
        assert len(signature) == 64
        assert verify(public_pem, value, data)
        assert verify(public_key_text(parse_public_key(public_pem)), value, data)
        assert verify_signed(public_pem, {**decision, "signature": {"algorithm": "ed25519", "value": value}})
        assert not verify(public_pem, value, canonical_bytes({**decision, "decision": "reject"}))

    def test_openssl_verifies_our_signature_with_an_openssl_key(self, openssl: str, tmp_path: Path) -> None:
        # Given a key openssl generated, read by our loader
        run([openssl, "genpkey", "-algorithm", "ed25519", "-out", "key.pem"], cwd=tmp_path)
        (tmp_path / "key.pem").chmod(0o600)
        run([openssl, "pkey", "-in", "key.pem", "-pubout", "-out", "pub.pem"], cwd=tmp_path)
        key = load_private_key(tmp_path / "key.pem")

        # When we sign a decision with it
        decision = a_decision(REASONS["astral_and_controls"])
        (tmp_path / "data").write_bytes(canonical_bytes(decision))
        (tmp_path / "sig").write_bytes(base64.b64decode(sign(key, decision, key_id="k1")["value"]))

        # Then openssl verifies the signature
        out = run(
            [
                openssl,
                "pkeyutl",
                "-verify",
                "-rawin",
                "-pubin",
                "-inkey",
                "pub.pem",
                "-in",
                "data",
                "-sigfile",
                "sig",
            ],
            cwd=tmp_path,
        )
        assert b"Signature Verified Successfully" in out

    def test_the_documented_openssl_commands_work(self, openssl: str, tmp_path: Path) -> None:
        # Given the section's shell commands, and the worked example's signed bytes as canonical.bin
        bash = shutil.which("bash")
        if bash is None:
            unavailable("bash is not on the PATH")
            return
        commands = signing_doc.snippet("Signing with openssl", "shell")
        (tmp_path / "canonical.bin").write_bytes(signing_doc.worked_example().canonical)

        # When they run
        out = run([bash, "-euo", "pipefail", "-c", commands], cwd=tmp_path)

        # Then openssl verified its own signature, and ours accepts the key text and signature they wrote
        assert b"Signature Verified Successfully" in out
        key_text = (tmp_path / "admin-key.txt").read_text().strip()
        assert key_text == public_key_text(parse_public_key((tmp_path / "admin-pub.pem").read_text()))
        value = (tmp_path / "signature.txt").read_text()
        assert verify(key_text, value, (tmp_path / "canonical.bin").read_bytes())


class TestNode:
    @pytest.mark.parametrize("reason", REASONS.values(), ids=REASONS.keys())
    def test_node_derives_our_canonical_bytes_and_its_signature_verifies(
        self, node: str, tmp_path: Path, reason: str
    ) -> None:
        # Given a keypair and a decision object
        key_text = generate_keypair(tmp_path / "key.pem")
        decision = a_decision(reason)

        # When Node builds the canonical JSON from the object itself and signs it
        signed = node_json(
            node,
            NODE_SIGN,
            {"decision": decision, "private_key_pem": (tmp_path / "key.pem").read_text()},
        )

        # Then Node's bytes are ours, and our verify accepts its signature
        assert base64.b64decode(signed["canonical"]) == canonical_bytes(decision)
        message = {
            **decision,
            "signature": {"key_id": "k1", "algorithm": "ed25519", "value": signed["value"]},
        }
        assert verify_signed(key_text, message)
        assert not verify_signed(key_text, {**message, "reason": reason + "."})

    def test_node_verifies_our_signature(self, node: str) -> None:
        # Given a decision we signed
        key = Ed25519PrivateKey.generate()
        decision = a_decision(REASONS["non_ascii_and_a_newline"])
        message = {**decision, "signature": sign(key, decision, key_id="k1")}

        # Then Node, deriving the bytes itself, accepts it and refuses a tampered copy
        payload = {"public_key": public_key_text(key), "message": message}
        assert run([node, "-e", NODE_VERIFY], stdin=json.dumps(payload).encode()) == b"valid"
        tampered = {**payload, "message": {**message, "admin_id": "mallory"}}
        assert run([node, "-e", NODE_VERIFY], stdin=json.dumps(tampered).encode()) == b"invalid"

    def test_the_documented_node_snippet_signs_and_verifies_the_worked_example(self, node: str) -> None:
        # Given the section's Node.js functions and its worked example
        example = signing_doc.worked_example()
        unsigned = {name: value for name, value in example.decision.items() if name != "signature"}
        driver = signing_doc.snippet("Signing in Node.js (crypto)", "javascript") + (
            "\nconst input = JSON.parse(require('node:fs').readFileSync(0, 'utf8'));"
            "\nconst signed = sign(input.unsigned, 'dana-2026-11', input.pem);"
            "\nconst tampered = { ...signed, decision: 'reject' };"
            "\nprocess.stdout.write(JSON.stringify({ signed, valid: verify(signed, input.key),"
            " tampered: verify(tampered, input.key) }));\n"
        )

        # When Node runs them
        out = node_json(
            node,
            driver,
            {"unsigned": unsigned, "pem": example.private_key_pem, "key": example.public_key_text},
        )

        # Then they produce the documented message, and verify it but not a tampered copy
        assert out == {"signed": example.decision, "valid": True, "tampered": False}
