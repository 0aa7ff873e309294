"""Docs that cannot go stale: links resolve, the README's layout is the tree, its numbers are the
committed JSON's, the results index lists every report, and CI runs the README's test command."""

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
README = ROOT / "README.md"
LINK = re.compile(r"\]\(([^)#\s]+)(#[^)]*)?\)")


def _markdown_files():
    return [README, *sorted((ROOT / "docs").rglob("*.md"))]


@pytest.mark.parametrize("doc", _markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(doc):
    broken = [m.group(1) for m in LINK.finditer(doc.read_text())
              if "://" not in m.group(1) and not m.group(1).startswith("mailto:") and not (doc.parent / m.group(1)).exists()]
    assert not broken, broken


def test_the_readme_is_a_front_door():
    text = README.read_text()
    assert len(text.splitlines()) <= 100
    assert text.index("## Documentation") > text.index("## Use") > text.index("## Install")
    docs = re.findall(r"^- \[(docs/[^\]]+)\]", text[text.index("## Documentation"):], re.M)
    assert docs[0] == "docs/quickstart.md"


def test_ci_runs_the_readme_test_command():
    commands = re.findall(r"^(pip install .*?) && (python -m pytest.*?)\s+#", README.read_text(), re.M)
    install, test = commands[-1]
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test.strip() in ci and any(line.startswith(install.replace('pip install', 'pip install -q')) for line in ci)


def test_the_readme_layout_is_the_tree():
    block = README.read_text().split("## Layout", 1)[1].split("```")[1]
    listed: dict[str, set[str]] = {}
    for line in block.strip().splitlines():
        where, _, names = line.partition(" ")
        if where.startswith("src/ofe/"):
            listed[where.rstrip("/")] = set(names.split())
    src = ROOT / "src" / "ofe"
    actual = {"src/ofe": {p.name for p in src.glob("*.py") if p.name not in ("__init__.py", "__main__.py")}}
    for package in sorted(p for p in src.iterdir() if (p / "__init__.py").is_file()):
        actual[f"src/ofe/{package.name}"] = {p.name for p in package.glob("*.py") if p.name != "__init__.py"}
    assert listed == actual


def test_the_results_index_lists_every_report():
    results = ROOT / "docs" / "results"
    index = (results / "README.md").read_text()
    linked = {m.group(1) for m in LINK.finditer(index)}
    reports = {str(p.relative_to(results)) for p in results.rglob("*.md")
               if p.name != "README.md" and "raw" not in p.parts}
    assert reports <= linked, sorted(reports - linked)
    assert not [p.name for p in results.glob("*.py")], "scripts belong in scripts/"


def _pct(x: float) -> str:
    return f"{x:+.2f}%" if abs(x) < 1 else f"{x:+.1f}%"


def test_the_readme_quotes_the_committed_main_job():
    """The README's C8 numbers are the committed main job's: its verdict, pairs held, Pre-LN + AdamW's W8A8
    cost at its highest band lr per seed and OP + SOAP's range over its band."""
    claims = json.loads((ROOT / "docs/results/studies/reproduce/claims.json").read_text())
    c8 = next(c for c in claims["claims"] if c["id"] == "C8")
    judged = [r for r in c8["data"] if "context" not in r]
    text = README.read_text()
    assert f"C8 {c8['verdict']}" in text
    assert f"at {sum(r['agrees'] for r in judged)} of {len(judged)}" in text.replace("\n", " ")
    top = max(r["lr_preln_adamw"] for r in judged)
    by_seed = {r["seed"]: r["w8a8_pct_preln_adamw"] for r in judged if r["lr_preln_adamw"] == top}
    assert f"**{' / '.join(_pct(by_seed[s]) for s in sorted(by_seed))}**" in text, by_seed
    soap = [r["w8a8_pct_op_soap"] for r in judged]
    assert f"**{_pct(min(soap))} to {_pct(max(soap))}**" in text, (min(soap), max(soap))


REALTEXT = ROOT / "docs/results/studies/realtext-cpu"


def realtext_tables(claims: dict) -> list[str]:
    """The band table and the C8 per-pair table of the real-text study, as the doc prints them (from its
    committed claims.json; the doc must contain both verbatim)."""
    bands = ["| arm | lr | mean final val loss | gap to the best | epsilon | in band |", "| --- | --- | --- | --- | --- | --- |"]
    for b in claims["lr_bands"]:
        gap = "best" if b["gap"] == 0 else f"+{b['gap']:.4f} +- {b['gap_se']:.4f}"
        bands.append(f"| {b['arm']} | {b['lr']:g} | {b['mean_val_loss']:.4f} | {gap} | {b['epsilon']:.4f} | "
                     f"{'in' if b['in_band'] else 'out'} |")
    c8 = next(c for c in claims["claims"] if c["id"] == "C8")
    pairs = ["| seed | lrs (AdamW / SOAP) | W8A8 Pre-LN + AdamW | W8A8 OP + SOAP | max kurtosis AdamW / SOAP | "
             "at matched loss | held |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in (r for r in c8["data"] if "context" not in r):
        matched = (f"{_pct(r['w8a8_pct_preln_adamw_matched'])} vs {_pct(r['w8a8_pct_op_soap_matched'])}"
                   if r.get("w8a8_pct_op_soap_matched") is not None else "not reached")
        pairs.append(f"| {r['seed']} | {r['lr_preln_adamw']:g} / {r['lr_op_soap']:g} | {_pct(r['w8a8_pct_preln_adamw'])} | "
                     f"{_pct(r['w8a8_pct_op_soap'])} | {r['max_kurtosis_preln_adamw']:.1f} / {r['max_kurtosis_op_soap']:.1f} | "
                     f"{matched} | {'yes' if r['agrees'] else 'no'} |")
    return ["\n".join(bands), "\n".join(pairs)]


def test_the_realtext_study_doc_quotes_its_committed_claims():
    """docs/results/studies/realtext.md prints the committed study's band table, C8 pairs and verdict."""
    claims = json.loads((REALTEXT / "claims.json").read_text())
    text = (ROOT / "docs/results/studies/realtext.md").read_text()
    c8 = next(c for c in claims["claims"] if c["id"] == "C8")
    assert f"**C8 {c8['verdict']}**" in text
    for table in realtext_tables(claims):
        assert table in text, table
