"""The rulebook: docs/claims-protocol.md lists every claim's current rule version and the rule's hash."""

import hashlib
import re
from pathlib import Path

from ofe.analysis.claims import CLAIMS

DOC = Path(__file__).parents[1] / "docs" / "claims-protocol.md"


def _section(title: str) -> str:
    text = DOC.read_text()
    start = text.index(f"## {title}")
    end = text.find("\n## ", start + 1)
    return text[start: end if end > 0 else None]


def test_the_current_rules_table_matches_every_claim_of_the_code():
    rows = re.findall(r"^\| (C\d[a-d]?) \| (\d+) \| ([0-9a-f]{16}) \|", _section("Current rules"), re.M)
    assert [r[0] for r in rows] == list(CLAIMS)
    for cid, version, digest in rows:
        claim = CLAIMS[cid]
        assert int(version) == claim.version, f"{cid}: the code's rule is version {claim.version}, the doc says {version}"
        assert hashlib.sha256(claim.rule.encode()).hexdigest()[:16] == digest, (
            f"{cid}'s rule text changed without a new version (bump Claim.version, add a changelog line, update the hash)")


def test_the_changelog_has_every_version_once_in_order():
    rows = re.findall(r"^\| (C\d[a-d]?) \| (\d+) \| (\d{4}-\d\d-\d\d) \|", _section("Changelog"), re.M)
    for cid, claim in CLAIMS.items():
        versions = [int(v) for c, v, _ in rows if c == cid]
        assert versions == list(range(1, claim.version + 1)), (cid, versions)


def test_the_doc_states_every_rule_word_for_word():
    text = _section("Current rules")
    for claim in CLAIMS.values():
        assert f"- **{claim.id}** (v{claim.version}): {claim.rule}." in text, claim.id
