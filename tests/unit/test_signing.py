"""Ed25519 signatures on admin decisions: the canonical form, signing, verifying, keys, the documented example."""

from __future__ import annotations

import base64
import json
import os
import stat
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from hypothesis import given
from hypothesis import strategies as st

from infra.credentials.signing import (
    SigningKeyError,
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

ROOT = Path(__file__).resolve().parents[2]

#: RFC 8032, section 7.1, test 1: a published key, so the expected values below can be checked by anyone.
RFC8032_SEED = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
RFC8032_PUBLIC = bytes.fromhex("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a")
EXAMPLE_KEY = Ed25519PrivateKey.from_private_bytes(RFC8032_SEED)
EXAMPLE_KEY_TEXT = "ed25519:" + base64.b64encode(RFC8032_PUBLIC).decode()

EXAMPLE_DECISION: dict[str, Any] = {
    "version": 2,
    "type": "access_request.decided",
    "decision_id": "5e3b8a2c-6d14-4f70-9a1e-3c8b7d2f6a05",
    "request_id": "c4a7e2d1-9f3b-4c68-a5e0-2b7d9f1c3e86",
    "decision": "approve",
    "admin_id": "dana",
    "reason": "Partner contract signed; welcome aboard, Zo\u00eb.",
    "decided_at": "2026-11-27T10:00:00Z",
    "audience": "accessflow",
}
EXAMPLE_BYTES = (
    b'{"admin_id":"dana","audience":"accessflow","decided_at":"2026-11-27T10:00:00Z",'
    b'"decision":"approve","decision_id":"5e3b8a2c-6d14-4f70-9a1e-3c8b7d2f6a05",'
    b'"reason":"Partner contract signed; welcome aboard, Zo\xc3\xab.",'
    b'"request_id":"c4a7e2d1-9f3b-4c68-a5e0-2b7d9f1c3e86","type":"access_request.decided","version":2}'
)
EXAMPLE_SIGNATURE = "HiDjbAkSPF3JjQtEk6iO2SjCCOmt7WulyORgW7UUnTi4AD3Fj65vCHWHHbfy5ru9uJ8KGip1uZ9dmMG0kx2lAg=="


def a_decision(**changes: object) -> dict[str, Any]:
    decision: dict[str, Any] = {
        "version": 2,
        "type": "access_request.decided",
        "decision_id": str(uuid.uuid4()),
        "request_id": str(uuid.uuid4()),
        "decision": "reject",
        "admin_id": f"admin-{uuid.uuid4().hex[:8]}",
        "reason": "The Partner plan is for contracted partners.\nStarter covers your volume.",
        "decided_at": "2026-11-27T10:00:00Z",
        "audience": "accessflow",
    }
    decision.update(changes)
    return decision


def signed(decision: dict[str, Any], key: Ed25519PrivateKey, key_id: str = "k1") -> dict[str, Any]:
    return {**decision, "signature": sign(key, decision, key_id=key_id)}


def pem_of(key: Ed25519PrivateKey | rsa.RSAPrivateKey, password: bytes | None = None) -> bytes:
    encryption = serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption()
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)


def write_key(path: Path, content: bytes, mode: int = 0o600) -> Path:
    path.write_bytes(content)
    path.chmod(mode)
    return path


# --- the canonical form ------------------------------------------------------------------------------


class TestCanonicalBytes:
    def test_a_fixed_decision_gives_exactly_these_bytes(self) -> None:
        assert canonical_bytes(EXAMPLE_DECISION) == EXAMPLE_BYTES

    def test_are_what_json_dumps_writes_sorted_and_compact_without_ascii_escapes(self) -> None:
        decision = a_decision(reason="d\u00e9j\u00e0 vu \u2713\nsecond line")
        assert canonical_bytes(decision) == json.dumps(
            decision, sort_keys=True, separators=(",", ":"), ensure_ascii=False
        ).encode("utf-8")

    def test_leave_the_signature_member_out(self) -> None:
        assert canonical_bytes({**EXAMPLE_DECISION, "signature": {"value": "x"}}) == EXAMPLE_BYTES
        assert canonical_bytes({**EXAMPLE_DECISION, "signature": 1.5}) == EXAMPLE_BYTES

    def test_do_not_depend_on_the_order_of_the_members(self) -> None:
        assert canonical_bytes(dict(reversed(list(EXAMPLE_DECISION.items())))) == EXAMPLE_BYTES

    def test_write_non_ascii_as_itself_and_escape_controls_as_json_stringify_does(self) -> None:
        fields = {"reason": 'd\u00e9j\u00e0 vu \u2713 \U0001f600\n\t"\\\x1f\x7f'}
        assert canonical_bytes(fields) == (
            b'{"reason":"d\xc3\xa9j\xc3\xa0 vu \xe2\x9c\x93 \xf0\x9f\x98\x80\\n\\t\\"\\\\\\u001f\x7f"}'
        )

    @given(
        st.dictionaries(
            st.text(alphabet=st.characters(max_codepoint=127), max_size=12),
            st.one_of(
                st.text(alphabet=st.characters(blacklist_categories=["Cs"])),
                st.integers(min_value=-(2**53) + 1, max_value=2**53 - 1),
            ),
            max_size=12,
        )
    )
    def test_parse_back_to_the_same_object(self, fields: dict[str, str | int]) -> None:
        unsigned = {name: value for name, value in fields.items() if name != "signature"}
        assert json.loads(canonical_bytes(fields).decode("utf-8")) == unsigned

    @pytest.mark.parametrize(
        ("fields", "complaint"),
        [
            ({"amount": 1.0}, "floats"),
            ({"urgent": True}, "booleans"),
            ({"reason": None}, "NoneType"),
            ({"admin": {"id": "dana"}}, "dict"),
            ({"products": ["a"]}, "list"),
            ({1: "one"}, "must be strings"),
            ({"r\u00e9ason": "x"}, "ASCII"),
            ({"reason": "half a pair \ud83d"}, "lone surrogate"),
            ({"version": 2**53}, "beyond 2"),
            ({"version": -(2**53)}, "beyond 2"),
        ],
    )
    def test_refuse_what_languages_would_write_differently(self, fields: Any, complaint: str) -> None:
        with pytest.raises(ValueError, match=complaint):
            canonical_bytes(fields)

    def test_refuse_anything_but_an_object(self) -> None:
        with pytest.raises(ValueError, match="JSON object"):
            canonical_bytes(["not", "an", "object"])  # type: ignore[arg-type]


# --- signing and verifying ---------------------------------------------------------------------------


class TestSignAndVerify:
    def test_the_fixed_key_gives_the_fixed_signature(self) -> None:
        # Ed25519 is deterministic: the same key and bytes always give the same signature.
        assert sign(EXAMPLE_KEY, EXAMPLE_DECISION, key_id="dana-2026-11") == {
            "key_id": "dana-2026-11",
            "algorithm": "ed25519",
            "value": EXAMPLE_SIGNATURE,
        }

    def test_a_signature_verifies_with_the_public_key(self) -> None:
        # Given a decision signed by a fresh key
        key = Ed25519PrivateKey.generate()
        decision = signed(a_decision(), key)

        # Then the signature verifies against its canonical bytes, and the whole message verifies
        assert verify(public_key_text(key), decision["signature"]["value"], canonical_bytes(decision))
        assert verify_signed(public_key_text(key), decision)

    @pytest.mark.parametrize("field", sorted(a_decision()))
    def test_changing_any_signed_field_breaks_the_signature(self, field: str) -> None:
        # Given a signed decision
        key = Ed25519PrivateKey.generate()
        decision = signed(a_decision(), key)

        # When one signed field is changed, however slightly
        original = decision[field]
        decision[field] = original + 1 if isinstance(original, int) else original + " "

        # Then it no longer verifies
        assert not verify_signed(public_key_text(key), decision)

    def test_adding_or_removing_a_member_breaks_the_signature(self) -> None:
        key = Ed25519PrivateKey.generate()
        decision = signed(a_decision(), key)

        assert not verify_signed(public_key_text(key), {**decision, "extra": "x"})
        assert not verify_signed(
            public_key_text(key), {name: value for name, value in decision.items() if name != "reason"}
        )

    def test_another_key_does_not_verify_it(self) -> None:
        decision = signed(a_decision(), Ed25519PrivateKey.generate())

        assert not verify_signed(public_key_text(Ed25519PrivateKey.generate()), decision)

    def test_the_key_id_is_not_signed_so_callers_must_match_it_to_admin_id(self) -> None:
        # The key id only selects a key; the verifier's lookup is what ties the key to the signed admin_id.
        key = Ed25519PrivateKey.generate()
        decision = signed(a_decision(), key, key_id="k1")
        decision["signature"] = {**decision["signature"], "key_id": "k2"}

        assert verify_signed(public_key_text(key), decision)

    def test_an_empty_key_id_is_refused(self) -> None:
        with pytest.raises(ValueError, match="key_id"):
            sign(EXAMPLE_KEY, EXAMPLE_DECISION, key_id="")

    def test_fields_without_a_canonical_form_cannot_be_signed(self) -> None:
        with pytest.raises(ValueError, match="floats"):
            sign(EXAMPLE_KEY, {**EXAMPLE_DECISION, "amount": 1.5}, key_id="k1")


def _other_encoding_of_the_same_signature() -> str:
    # The last character of 64 bytes in base64 carries 2 data bits and 4 padding bits;
    # setting a padding bit gives a string that lenient decoders map to the same bytes.
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    last = EXAMPLE_SIGNATURE[-3]
    return EXAMPLE_SIGNATURE[:-3] + alphabet[alphabet.index(last) | 1] + "=="


def _rsa_public_pem() -> str:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


class TestHostileInputGivesFalse:
    @pytest.mark.parametrize(
        "signature",
        [
            "",
            "not base64 at all!",
            EXAMPLE_SIGNATURE[:-2],  # no padding
            EXAMPLE_SIGNATURE.rstrip("=") + "A=",  # wrong padding
            EXAMPLE_SIGNATURE[:40] + "\n" + EXAMPLE_SIGNATURE[40:-1],  # a line break, same length
            _other_encoding_of_the_same_signature(),
            base64.b64encode(base64.b64decode(EXAMPLE_SIGNATURE)[:63]).decode(),  # 63 bytes
            base64.b64encode(base64.b64decode(EXAMPLE_SIGNATURE) + b"\0").decode(),  # 65 bytes
            base64.b64encode(bytes(64)).decode(),  # all zero
            "\u00e9" * 88,
            None,
            EXAMPLE_SIGNATURE.encode(),
            64,
        ],
    )
    def test_a_malformed_signature(self, signature: Any) -> None:
        assert signature != EXAMPLE_SIGNATURE
        assert verify(EXAMPLE_KEY_TEXT, signature, EXAMPLE_BYTES) is False

    def test_a_signature_in_the_url_safe_alphabet(self) -> None:
        # Given a valid signature whose standard base64 holds "+" or "/"
        data = next(
            b"%d" % i
            for i in range(1000)
            if {"+", "/"} & set(base64.b64encode(EXAMPLE_KEY.sign(b"%d" % i)).decode())
        )
        standard = base64.b64encode(EXAMPLE_KEY.sign(data)).decode()
        assert verify(EXAMPLE_KEY_TEXT, standard, data)

        # Then the same bytes in the URL-safe alphabet are refused: one spelling per signature
        assert verify(EXAMPLE_KEY_TEXT, standard.replace("+", "-").replace("/", "_"), data) is False

    def test_the_noncanonical_spelling_would_decode_to_the_real_signature(self) -> None:
        # Guard for the case above: a lenient decoder would have accepted it.
        lenient = base64.b64decode(_other_encoding_of_the_same_signature())
        assert lenient == base64.b64decode(EXAMPLE_SIGNATURE)

    @pytest.mark.parametrize(
        "key_text",
        [
            "",
            "ed25519:",
            "ed25519:AAAA",
            EXAMPLE_KEY_TEXT.removeprefix("ed25519:"),  # no prefix
            EXAMPLE_KEY_TEXT.rstrip("="),  # no padding
            "Ed25519:" + EXAMPLE_KEY_TEXT.removeprefix("ed25519:"),
            "ed25519:" + base64.b64encode(bytes(33)).decode(),
            "-----BEGIN PUBLIC KEY-----\ngarbage\n-----END PUBLIC KEY-----\n",
            "-----BEGIN PUBLIC KEY-----\n\u00e9\n-----END PUBLIC KEY-----\n",
            _rsa_public_pem(),
            None,
            RFC8032_PUBLIC,
        ],
    )
    def test_a_malformed_key(self, key_text: Any) -> None:
        assert verify(key_text, EXAMPLE_SIGNATURE, EXAMPLE_BYTES) is False

    @pytest.mark.parametrize("data", [EXAMPLE_BYTES.decode(), None, bytearray(EXAMPLE_BYTES)])
    def test_data_that_is_not_bytes(self, data: Any) -> None:
        assert verify(EXAMPLE_KEY_TEXT, EXAMPLE_SIGNATURE, data) is False

    @pytest.mark.parametrize(
        "message",
        [
            EXAMPLE_DECISION,  # no signature member
            {**EXAMPLE_DECISION, "signature": EXAMPLE_SIGNATURE},
            {**EXAMPLE_DECISION, "signature": {"algorithm": "ed25519"}},
            {**EXAMPLE_DECISION, "signature": {"algorithm": "ed25519", "value": 7}},
            {**EXAMPLE_DECISION, "signature": {"algorithm": "hmac-sha256", "value": EXAMPLE_SIGNATURE}},
            {**EXAMPLE_DECISION, "signature": {"value": EXAMPLE_SIGNATURE}},
            {
                **EXAMPLE_DECISION,
                "amount": 1.5,
                "signature": {"algorithm": "ed25519", "value": EXAMPLE_SIGNATURE},
            },
            {1: "x", "signature": {"algorithm": "ed25519", "value": EXAMPLE_SIGNATURE}},
            [EXAMPLE_DECISION],
            None,
        ],
    )
    def test_a_malformed_message(self, message: Any) -> None:
        assert verify_signed(EXAMPLE_KEY_TEXT, message) is False

    @given(st.text(), st.text(), st.binary())
    def test_never_raises_on_arbitrary_text(self, key_text: str, signature: str, data: bytes) -> None:
        assert verify(key_text, signature, data) is False

    @given(st.from_type(object))
    def test_never_raises_on_arbitrary_values(self, value: Any) -> None:
        assert verify(value, value, value) is False
        assert verify_signed(EXAMPLE_KEY_TEXT, {**EXAMPLE_DECISION, "signature": value}) is False


# --- keys --------------------------------------------------------------------------------------------


class TestPublicKeyText:
    def test_is_the_prefix_and_the_base64_of_the_raw_key(self) -> None:
        assert public_key_text(EXAMPLE_KEY) == EXAMPLE_KEY_TEXT
        assert public_key_text(EXAMPLE_KEY.public_key()) == EXAMPLE_KEY_TEXT

    def test_parses_back_to_the_same_key(self) -> None:
        assert public_key_text(parse_public_key(EXAMPLE_KEY_TEXT)) == EXAMPLE_KEY_TEXT

    def test_an_spki_pem_is_read_too(self) -> None:
        pem = (
            EXAMPLE_KEY.public_key()
            .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
            .decode()
        )
        assert public_key_text(parse_public_key(pem)) == EXAMPLE_KEY_TEXT

    def test_surrounding_whitespace_is_ignored(self) -> None:
        assert public_key_text(parse_public_key(f"  {EXAMPLE_KEY_TEXT}\n")) == EXAMPLE_KEY_TEXT

    @pytest.mark.parametrize(
        ("text", "complaint"),
        [
            ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIA", "must be 'ed25519:"),
            ("ed25519:AAAA", "44 characters"),
            ("-----BEGIN PUBLIC KEY-----\ngarbage\n-----END PUBLIC KEY-----", "not a readable SPKI PEM"),
            (_rsa_public_pem(), "not an Ed25519 public key"),
        ],
    )
    def test_anything_else_is_refused_with_a_reason(self, text: str, complaint: str) -> None:
        with pytest.raises(ValueError, match=complaint):
            parse_public_key(text)


class TestGenerateKeypair:
    def test_writes_a_private_key_only_its_owner_can_read_and_the_public_key_text(
        self, tmp_path: Path
    ) -> None:
        # When a keypair is generated
        path = tmp_path / "dana.pem"
        text = generate_keypair(path)

        # Then the private key is a PKCS#8 PEM with mode 0600, and PATH.pub holds the returned text
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert path.read_text().startswith("-----BEGIN PRIVATE KEY-----\n")
        assert (tmp_path / "dana.pem.pub").read_text() == text + "\n"
        assert public_key_text(load_private_key(path)) == text
        assert isinstance(parse_public_key(text), Ed25519PublicKey)

    def test_the_private_key_is_0600_whatever_the_umask(self, tmp_path: Path) -> None:
        previous = os.umask(0o277)  # would strip the owner's write bit
        try:
            path = tmp_path / "dana.pem"
            generate_keypair(path)
        finally:
            os.umask(previous)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600

    def test_each_call_makes_a_new_key(self, tmp_path: Path) -> None:
        assert generate_keypair(tmp_path / "a") != generate_keypair(tmp_path / "b")

    @pytest.mark.parametrize("existing", ["dana.pem", "dana.pem.pub"])
    def test_refuses_to_overwrite_either_file(self, tmp_path: Path, existing: str) -> None:
        # Given one of the two files exists already
        (tmp_path / existing).write_text("precious")

        # When a keypair is generated there
        with pytest.raises(FileExistsError, match="refusing to overwrite"):
            generate_keypair(tmp_path / "dana.pem")

        # Then nothing was changed or left behind
        assert [p.name for p in tmp_path.iterdir()] == [existing]
        assert (tmp_path / existing).read_text() == "precious"


class TestLoadPrivateKey:
    def test_reads_a_pkcs8_key(self, tmp_path: Path) -> None:
        path = write_key(tmp_path / "key.pem", pem_of(EXAMPLE_KEY))
        assert public_key_text(load_private_key(path)) == EXAMPLE_KEY_TEXT

    def test_reads_an_encrypted_key_with_its_password(self, tmp_path: Path) -> None:
        path = write_key(tmp_path / "key.pem", pem_of(EXAMPLE_KEY, password=b"correct horse"))
        assert public_key_text(load_private_key(path, password=b"correct horse")) == EXAMPLE_KEY_TEXT

    def test_a_missing_file_says_how_to_create_one(self, tmp_path: Path) -> None:
        with pytest.raises(SigningKeyError, match="accessflow keys admin-generate"):
            load_private_key(tmp_path / "absent.pem")

    @pytest.mark.parametrize("mode", [0o640, 0o604, 0o620, 0o666])
    def test_a_file_others_can_reach_is_refused(self, tmp_path: Path, mode: int) -> None:
        path = write_key(tmp_path / "key.pem", pem_of(EXAMPLE_KEY), mode=mode)
        with pytest.raises(SigningKeyError, match=f"mode {mode:04o}.*chmod 600"):
            load_private_key(path)

    def test_a_directory_is_refused(self, tmp_path: Path) -> None:
        (tmp_path / "keys").mkdir(mode=0o700)
        with pytest.raises(SigningKeyError, match=r"cannot read the private key .*: Is a directory"):
            load_private_key(tmp_path / "keys")

    def test_an_encrypted_key_without_its_password_is_refused(self, tmp_path: Path) -> None:
        path = write_key(tmp_path / "key.pem", pem_of(EXAMPLE_KEY, password=b"correct horse"))
        with pytest.raises(SigningKeyError, match="encrypted"):
            load_private_key(path)

    def test_a_wrong_password_is_refused(self, tmp_path: Path) -> None:
        path = write_key(tmp_path / "key.pem", pem_of(EXAMPLE_KEY, password=b"correct horse"))
        with pytest.raises(SigningKeyError, match="password"):
            load_private_key(path, password=b"battery staple")

    def test_an_rsa_key_is_refused(self, tmp_path: Path) -> None:
        rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        path = write_key(tmp_path / "key.pem", pem_of(rsa_key))
        with pytest.raises(SigningKeyError, match="not an Ed25519 private key"):
            load_private_key(path)

    def test_a_file_that_is_no_pem_is_refused(self, tmp_path: Path) -> None:
        path = write_key(tmp_path / "key.pem", EXAMPLE_KEY_TEXT.encode())
        with pytest.raises(SigningKeyError, match="not a readable PEM private key"):
            load_private_key(path)


class TestAdminGenerateCommand:
    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "infra.cli.main", "keys", "admin-generate", *args],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    def test_writes_the_keypair_and_says_how_to_register_it(self, tmp_path: Path) -> None:
        # When an admin generates a key
        path = tmp_path / "dana.pem"
        result = self.run(str(path))

        # Then the command prints the public key and the command that registers it
        assert result.returncode == 0, result.stderr
        text = (tmp_path / "dana.pem.pub").read_text().strip()
        assert text.startswith("ed25519:")
        assert text in result.stdout.splitlines()
        assert f"accessflow admins keys add ADMIN_ID --key-id KEY_ID --public-key '{text}'" in result.stdout
        assert public_key_text(load_private_key(path)) == text

    def test_refuses_to_overwrite_a_key(self, tmp_path: Path) -> None:
        path = tmp_path / "dana.pem"
        assert self.run(str(path)).returncode == 0
        before = path.read_bytes()

        result = self.run(str(path))

        assert result.returncode == 1
        assert "already exists" in result.stderr
        assert path.read_bytes() == before


# --- the documented example --------------------------------------------------------------------------


class TestTheDocumentedExample:
    """messages/asyncapi.yaml, "Signing admin decisions": producers copy it, so it must stay true."""

    def test_is_the_example_these_tests_use(self) -> None:
        example = signing_doc.worked_example()
        assert example.decision == {
            **EXAMPLE_DECISION,
            "signature": {"key_id": "dana-2026-11", "algorithm": "ed25519", "value": EXAMPLE_SIGNATURE},
        }
        assert example.canonical == EXAMPLE_BYTES

    def test_its_signed_bytes_are_the_canonical_form_of_its_decision(self) -> None:
        example = signing_doc.worked_example()
        assert canonical_bytes(example.decision) == example.canonical
        assert len(example.canonical) == example.stated_length

    def test_its_signature_verifies_with_its_public_key(self) -> None:
        example = signing_doc.worked_example()
        assert verify_signed(example.public_key_text, example.decision)
        assert verify_signed(example.public_key_pem, example.decision)
        assert verify(example.public_key_text, example.decision["signature"]["value"], example.canonical)

    def test_its_private_key_gives_its_public_key_and_its_signature(self) -> None:
        example = signing_doc.worked_example()
        private_key = serialization.load_pem_private_key(example.private_key_pem.encode(), password=None)
        assert isinstance(private_key, Ed25519PrivateKey)
        assert public_key_text(private_key) == example.public_key_text
        assert sign(private_key, example.decision, key_id="dana-2026-11") == example.decision["signature"]

    def test_its_public_pem_is_the_fixed_spki_prefix_and_the_key_texts_base64(self) -> None:
        example = signing_doc.worked_example()
        base64_line = example.public_key_pem.splitlines()[1]
        assert base64_line == "MCowBQYDK2VwAyEA" + example.public_key_text.removeprefix("ed25519:")
        assert base64.b64decode("MCowBQYDK2VwAyEA").hex() == "302a300506032b6570032100"

    def test_the_python_snippet_signs_and_verifies_it(self) -> None:
        # Given the section's Python code, run as a producer would paste it (fenced as "py": the
        # contract tests expect the description's one "python" block to be the pika example)
        namespace: dict[str, Any] = {}
        exec(signing_doc.snippet("Signing in Python (cryptography)", "py"), namespace)  # noqa: S102
        example = signing_doc.worked_example()
        unsigned = {name: value for name, value in example.decision.items() if name != "signature"}

        # Then it produces the documented message, verifies it, and rejects a tampered one
        produced = namespace["sign"](unsigned, "dana-2026-11", example.private_key_pem.encode())
        assert produced == example.decision
        assert namespace["verify"](produced, example.public_key_text) is True
        assert namespace["verify"]({**produced, "decision": "reject"}, example.public_key_text) is False
        assert verify_signed(example.public_key_text, produced)
