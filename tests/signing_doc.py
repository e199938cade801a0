"""The "Signing admin decisions" section of messages/asyncapi.yaml, read the way the tests check it.

The unit tests verify its worked example and run its Python snippet; the interop tests run its
Node.js and openssl snippets. Either way the document cannot drift from the code.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

import messages

ASYNCAPI = Path(messages.__file__).resolve().parent / "asyncapi.yaml"
SECTION = "## Signing admin decisions"
FENCE = re.compile(r"^```(\w+)\n(.*?)^```$", re.DOTALL | re.MULTILINE)


def section() -> str:
    """The section's Markdown, from its heading to the end of ``info.description``."""
    description = yaml.safe_load(ASYNCAPI.read_text(encoding="utf-8"))["info"]["description"]
    assert isinstance(description, str)
    assert description.count(SECTION) == 1, f"{SECTION!r} must appear once in info.description"
    return description[description.index(SECTION) :]


def subsection(title: str) -> str:
    """The text under ``### <title>``, up to the next heading of that level."""
    text = section()
    start = text.index(f"### {title}")
    end = text.find("\n### ", start + 1)
    return text[start : end if end != -1 else len(text)]


def blocks(text: str) -> list[tuple[str, str]]:
    """Every fenced code block as (language, content), in order."""
    return [(language, content) for language, content in FENCE.findall(text)]


def snippet(title: str, language: str) -> str:
    """The one code block of ``language`` under ``### <title>``."""
    found = [content for lang, content in blocks(subsection(title)) if lang == language]
    assert len(found) == 1, f"expected one {language} block under {title!r}, found {len(found)}"
    return found[0]


@dataclass(frozen=True)
class WorkedExample:
    private_key_pem: str
    public_key_text: str
    public_key_pem: str
    decision: dict[str, Any]
    canonical: bytes
    stated_length: int


def worked_example() -> WorkedExample:
    """The worked example's blocks: private PEM, key text, public PEM, signed decision, signed bytes."""
    text = subsection("Worked example")
    found = blocks(text)
    assert [language for language, _ in found] == ["pem", "text", "pem", "json", "text"]
    (_, private_pem), (_, key_text), (_, public_pem), (_, decision), (_, canonical) = found
    length = re.search(r"(\d+) bytes of UTF-8", text)
    assert length, "the worked example states the length of its signed bytes"
    assert canonical.endswith("\n") and canonical.count("\n") == 1, "the signed bytes are one line"
    return WorkedExample(
        private_key_pem=private_pem,
        public_key_text=key_text.strip(),
        public_key_pem=public_pem,
        decision=json.loads(decision),
        # The fence ends the line; the bytes themselves have no trailing newline.
        canonical=canonical.removesuffix("\n").encode("utf-8"),
        stated_length=int(length.group(1)),
    )
