"""Every number in a checked findings bullet has a source: docs/FINDINGS.md's bullets name the files they quote
(a backticked or linked path under results/, globs allowed, e.g. `results/overload/summary.csv`), and each
number in the bullet must stand in one of them, rounded as quoted (0.91 matches 0.908; 76% matches 0.7602).

A figure computed from quoted ones is written with its arithmetic, ``0.130 / 0.171 = 76%`` or
``1 / (60 x 0.2571) = 0.065``: its operands are checked like any number, the result against the arithmetic
(within the rounding of the operands and of the result). Not checked: numbers inside code spans and link
targets, the level of an interval (``95% interval``), and names such as c=8, p99 or t1. A bullet and its
sub-bullets are one unit. When the figures change (a re-run), update the bullet's numbers; the test says
which number has no source."""
import glob
import json
import os
import re

import pytest

from conftest import ROOT

FINDINGS = os.path.join(ROOT, "docs", "FINDINGS.md")
# The sections checked, by their heading; (section, bullet lead) -> why a bullet is not.
CHECKED = ("## Sharing a host: the kernel's controls against our controller", "## Overload: shedding by queueing delay",
           "## Protecting the owner: a saturated LLM beside the owner's work",
           "## Many hosts: the service's headroom steers HAProxy",
           "### Controllers against cgroups-only, in one sweep", "## Engines at the limit of this CPU",
           "### The thread defaults, measured")
CHECKED_BULLETS = {}  # heading -> the leads of the bullets checked in a section not checked whole
EXEMPT = {  # bullet lead -> why its numbers are not checked
    "Why `share_batch` missed the SLO": "sums of usage_usec over cgroup_runs and spans of per-request rows",
}

NUMBER = re.compile(r"(?<![\w.])(\d+(?:\.\d+)?)(%?)(?![\da-wyzA-Z_])")  # 4.18x, not a hash like 2019a1e
SOURCE = re.compile(r"`((?:\.\./)?results/[^`\s]+)`|\]\(((?:\.\./)?results/[^)\s]+)\)")
ARITHMETIC = re.compile(r"(?<![\w.])([(\d][\d.\s()x×/*+\-]*?[\d)])\s*=\s*(\d+(?:\.\d+)?)(%?)")
NAMES = re.compile(r"\b(?:c|p|t|T|S|x)=?\d+\b|\b(?:p\d+|t\d+|c=\d+|issue \d+)\b")
LEVEL = re.compile(r"95% (?:t-|Welch )?interval")


def bullets(text: str, heading: str) -> list[str]:
    """The bullets of the section under ``heading`` (to the next heading of the same or a higher level), each
    with its continuation lines and sub-bullets."""
    lines = text.splitlines()
    level = heading.split()[0]
    start = lines.index(heading)
    out, cur = [], None
    for line in lines[start + 1:]:
        if line.startswith("#") and len(line.split()[0]) <= len(level):
            break
        if line.startswith("- "):
            cur = [line]
            out.append(cur)
        elif cur is not None and line.startswith("  "):
            cur.append(line)
        else:
            cur = None
    return [" ".join(x.strip() for x in b) for b in out]


def _numbers_of(path: str) -> list[float]:
    with open(path, errors="replace") as f:
        text = f.read()
    if path.endswith(".json"):
        text = json.dumps(json.loads(text))
    return [float(m) for m in re.findall(r"\d+(?:\.\d+)?(?:[eE][-+]?\d+)?", text)]


def _half(q: str) -> float:
    return 0.5 * 10 ** -(len(q.split(".")[1]) if "." in q else 0)


def _stands_in(q: str, percent: bool, values) -> bool:
    target, tol = float(q), _half(q) + 1e-9
    return any(abs(v - target) <= tol or (percent and abs(100 * v - target) <= tol) for v in values)


def _arithmetic_ok(expr: str, q: str, percent: bool) -> bool:
    ops = re.findall(r"\d+(?:\.\d+)?", expr)
    clean = expr.replace("×", "*").replace("x", "*")
    if not re.fullmatch(r"[\d.\s()*/+\-]+", clean):
        return False
    value = eval(compile(clean, "<findings>", "eval"), {"__builtins__": {}})  # digits and operators only
    value *= 100 if percent else 1
    # an integer operand is a count, exact; a decimal one carries its rounding
    slack = sum(_half(o) / float(o) for o in ops if "." in o and float(o)) * abs(value)
    return abs(value - float(q)) <= _half(q) + slack + 1e-9


def unsourced(bullet: str, root: str = ROOT) -> list[str]:
    """The numbers of one bullet that stand in none of its sources (or why the bullet cannot be checked)."""
    paths = [a or b for a, b in SOURCE.findall(bullet)]
    files = sorted({f for p in paths for f in glob.glob(os.path.join(root, p.removeprefix("../")))
                    if os.path.isfile(f)})
    text = re.sub(r"\]\([^)]*\)", "]", re.sub(r"`[^`]*`", " ", bullet))
    text = LEVEL.sub(" ", text)
    derived, bad = set(), []
    for m in ARITHMETIC.finditer(text):
        expr, q, pct = m.groups()
        while expr.count("(") > expr.count(")"):  # an opening bracket of the prose, not of the arithmetic
            expr = expr[expr.index("(") + 1:]
        if re.search(r"[x×/*+]|\s-\s", expr) and re.search(r"\d", expr):
            if not _arithmetic_ok(expr, q, bool(pct)):
                bad.append(f"{expr.strip()} = {q}{pct} does not hold")
            derived.add(m.start(2))
    text_for_numbers = NAMES.sub(lambda m: " " * len(m.group()), text)
    wanted = [(m.group(1), bool(m.group(2))) for m in NUMBER.finditer(text_for_numbers)
              if m.start(1) not in derived]
    if wanted and not files:
        return [f"no source file named (or found) for {', '.join(q for q, _ in wanted)}"] + bad
    values = [abs(v) for f in files for v in _numbers_of(f)]
    return bad + [q + ("%" if p else "") for q, p in wanted if not _stands_in(q, p, values)]


def checked_bullets(text: str):
    """(section, bullet) of every bullet the test checks."""
    out = [(h, b) for h in CHECKED for b in bullets(text, h)]
    out += [(h, b) for h, leads in CHECKED_BULLETS.items() for b in bullets(text, h)
            if any(b.startswith(f"- **{lead}") for lead in leads)]
    return [(h, b) for h, b in out if not any(b.startswith(f"- **{lead}") for lead in EXEMPT)]


def test_every_number_of_a_checked_bullet_stands_in_its_source():
    text = open(FINDINGS).read()
    found = checked_bullets(text)
    assert len(found) >= 8  # the sections are there, and their bullets were found
    problems = {b[:70]: bad for _, b in found if (bad := unsourced(b))}
    assert not problems, problems


def test_the_exemptions_name_bullets_that_exist():
    text = open(FINDINGS).read()
    every = [b for h in CHECKED for b in bullets(text, h)]
    assert every[0].startswith("- **Capacity alone.") and every[-1].startswith("- **Unconstrained on this 2-core")
    assert all(any(b.startswith(f"- **{lead}") for b in every) for lead in EXEMPT)


@pytest.mark.parametrize("change", [("1.562x", "1.592x"), ("39.2 [32.4", "39.2 [31.4"), ("47.1 [37.4", "44.1 [37.4"),
                                    ("1.02 [0.91–1.12] (`--max", "1.08 [0.91–1.12] (`--max")])
def test_a_changed_number_is_reported(tmp_path, change):
    """The checker applied to a copy of the page with one quoted number changed reports it."""
    text = open(FINDINGS).read()
    section = CHECKED[1]
    before = [b for b in bullets(text, section) if change[0] in b]
    assert before and not any(unsourced(b) for b in before)
    copy = tmp_path / "FINDINGS.md"
    copy.write_text(text.replace(change[0], change[1]))
    after = [b for b in bullets(copy.read_text(), section) if change[1] in b]
    assert after and all(unsourced(b) for b in after)


def test_a_bullet_without_a_source_is_reported():
    assert unsourced("- **A claim.** It took 12.3 s.") == ["no source file named (or found) for 12.3"]
    assert unsourced("- **No figure here**, only words and c=8 and p99.") == []
    assert "1 / 4 = 0.4 does not hold" in unsourced("- 1 / 4 = 0.4 (`results/overload/summary.csv`)")
    assert unsourced("- 1 / 4 = 0.25 (`results/overload/summary.csv`)") == []
