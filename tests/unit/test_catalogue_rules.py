"""The catalogue file's rules and throttles: validated as the file is read, with errors that say where."""

from __future__ import annotations

from pathlib import Path

import pytest

from domain.rules import Rule, RuleKind
from infra.db import catalogue_file

HEAD = """
products:
  - {id: payments, name: Payments API, auth_method: api_key}
plans:
  - id: vetted
    name: Vetted
    auto_approve: false
    rate_limit_per_minute: 60
    products: [payments]
"""


def read(tmp_path: Path, plan_lines: str) -> catalogue_file.CatalogueFile:
    path = tmp_path / "catalog.yaml"
    path.write_text(HEAD + plan_lines)
    return catalogue_file.read(path)


class TestAPlansRulesAndThrottles:
    def test_are_read_in_order(self, tmp_path: Path) -> None:
        # Given a plan with two rules and both throttles
        catalogue = read(
            tmp_path,
            """    rules:
      - {kind: trusted_domain, domains: [acme.example, Initech.Example]}
      - {kind: rejected_domain, domains: [spam.example], reason: "Not for bulk resellers."}
      - {kind: holds_active_credential}
    max_open_requests_per_consumer: 3
    max_requests_per_consumer_per_hour: 10
""",
        )

        # When read / Then the rules are parsed in order, domains in lower case
        plan = catalogue.plans[0]
        assert plan.parsed_rules() == [
            Rule(RuleKind.TRUSTED_DOMAIN, domains=("acme.example", "initech.example")),
            Rule(RuleKind.REJECTED_DOMAIN, domains=("spam.example",), reason="Not for bulk resellers."),
            Rule(RuleKind.HOLDS_ACTIVE_CREDENTIAL),
        ]
        assert (plan.max_open_requests_per_consumer, plan.max_requests_per_consumer_per_hour) == (3, 10)

    def test_none_means_the_flag_decides_and_no_limit(self, tmp_path: Path) -> None:
        plan = read(tmp_path, "").plans[0]
        assert plan.parsed_rules() == []
        assert plan.max_open_requests_per_consumer is None
        assert plan.max_requests_per_consumer_per_hour is None

    @pytest.mark.parametrize(
        ("lines", "message"),
        [
            ("    rules: [{kind: vip}]\n", "plan 'vetted': rule 1: unknown kind 'vip'"),
            (
                "    rules:\n      - {kind: holds_active_credential}\n      - {kind: rejected_domain, domains: [x.example]}\n",
                "plan 'vetted': rule 2 (rejected_domain): needs a 'reason'",
            ),
            ("    rules: [{kind: trusted_domain, domains: [localhost]}]\n", "not an email domain: localhost"),
            ("    max_open_requests_per_consumer: 0\n", "max_open_requests_per_consumer"),
            ("    max_requests_per_consumer_per_hour: -1\n", "max_requests_per_consumer_per_hour"),
        ],
    )
    def test_a_bad_one_is_refused_with_where_and_why(self, tmp_path: Path, lines: str, message: str) -> None:
        # Given / When a file with a bad rule or throttle is read / Then it is refused, saying where and why
        with pytest.raises(catalogue_file.CatalogueFileError) as raised:
            read(tmp_path, lines)
        assert message in str(raised.value)


class TestAConsumersOwnThrottles:
    def test_are_read_and_checked(self, tmp_path: Path) -> None:
        # Given a consumer with its own limits / When read / Then they are there
        consumers = """consumers:
  - {id: acme, email: dev@acme.example, name: Acme, max_open_requests: 10, max_requests_per_hour: 50}
"""
        [consumer] = read(tmp_path, consumers).consumers
        assert (consumer.max_open_requests, consumer.max_requests_per_hour) == (10, 50)

        # And a limit that is not a positive number is refused, naming the field
        with pytest.raises(catalogue_file.CatalogueFileError, match="max_open_requests"):
            read(tmp_path, consumers.replace("max_open_requests: 10", "max_open_requests: 0"))
