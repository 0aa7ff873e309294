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


RESULTS = Path(__file__).parents[1] / "docs" / "results"


def _archived() -> set[str]:
    """Report folders listed under docs/results/README.md's "Archived verdicts" section."""
    text = (RESULTS / "README.md").read_text()
    section = text[text.index("## Archived verdicts"):]
    section = section[: section.find("\n## ", 1) if "\n## " in section[1:] else None]
    return set(re.findall(r"`(studies/[\w./-]+)/`", section))


def test_every_committed_verdict_is_judged_with_todays_rules_or_archived():
    """A committed claims.json is re-derived from its saved evidence with today's rules (``ofe rejudge``) and
    must equal it, verdict and rule version; one that cannot be (judged before rules had versions, runs
    not kept) must be listed as archived, so no old verdict passes for a current one."""
    from ofe.analysis.claims import evaluate_claims
    from ofe.report.write import read_evidence

    archived = _archived()
    current = 0
    for path in sorted(RESULTS.rglob("claims.json")):
        folder = str(path.parent.relative_to(RESULTS))
        if folder in archived:
            continue
        committed = {c["id"]: c for c in __import__("json").loads(path.read_text())["claims"]}
        assert set(committed) == set(CLAIMS), f"{folder}: claims {sorted(committed)}; run `ofe rejudge docs/results`"
        for cid, c in committed.items():
            assert c.get("rule_version") == CLAIMS[cid].version, (
                f"{folder}: {cid} judged with rule v{c.get('rule_version')}, today's is v{CLAIMS[cid].version}: "
                "run `ofe rejudge docs/results`")
        evidence = path.parent / "evidence.json.gz"
        assert evidence.is_file(), f"{folder}: no evidence.json.gz to re-derive its verdicts from"
        _, runs = read_evidence(evidence)
        for result in evaluate_claims(runs):
            assert result.status == committed[result.id]["verdict"], (folder, result.id)
        current += 1
    assert current >= 1, "no committed report is judged with today's rules"
    assert all((RESULTS / a).is_dir() for a in archived), "an archived folder that does not exist"
