#!/usr/bin/env python3
"""Dependency audit (REQUIREMENTS.md D5): checks every crates.io package in Cargo.lock

1. against the crates.io index: a version its authors yanked (usually for a bug or a security
   problem) fails the audit;
2. against the RustSec advisory database (https://github.com/rustsec/advisory-db): a version an
   advisory affects fails the audit; informational advisories (unmaintained, unsound) are
   printed as warnings. The database is read from $HAFEN_ADVISORY_DB (a checkout) or cloned
   from GitHub; when neither works the check says so loudly and is not counted as passed
   (exit status 3 with --require-advisories, otherwise a warning).

Accepted findings are listed in scripts/dep-audit-allow.txt with a reason, one per line:
`RUSTSEC-2020-0001 reason` or `yanked:name@version reason`.

Exit status: 0 clean, 1 findings, 2 the index could not be read, 3 advisories required but
the database could not be had. Runs in CI through scripts/test.sh; see docs/upgrading.md.
"""

import concurrent.futures
import json
import os
import re
import subprocess
import sys
import tempfile
import tomllib
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CRATES_IO = "registry+https://github.com/rust-lang/crates.io-index"
INDEX = os.environ.get("HAFEN_CRATES_INDEX", "https://index.crates.io")
ADVISORY_REPO = "https://github.com/rustsec/advisory-db"


def locked_packages():
    lock = tomllib.loads((ROOT / "Cargo.lock").read_text())
    return sorted(
        {(p["name"], p["version"]) for p in lock.get("package", []) if p.get("source") == CRATES_IO}
    )


def allowed():
    f = ROOT / "scripts" / "dep-audit-allow.txt"
    ids = set()
    if f.exists():
        for line in f.read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                ids.add(line.split()[0])
    return ids


# --- crates.io index: yanked versions -------------------------------------------------------

def index_path(name):
    n = name.lower()
    if len(n) <= 2:
        return f"{len(n)}/{n}"
    if len(n) == 3:
        return f"3/{n[0]}/{n}"
    return f"{n[0:2]}/{n[2:4]}/{n}"


def yanked_versions(name):
    url = f"{INDEX}/{index_path(name)}"
    last = None
    for _ in range(3):
        try:
            with urllib.request.urlopen(url, timeout=30) as r:
                body = r.read(50_000_000).decode()
            return {
                e["vers"]
                for e in (json.loads(l) for l in body.splitlines() if l.strip())
                if e.get("yanked")
            }
        except Exception as e:  # network errors: retried, then reported
            last = e
    raise RuntimeError(f"{url}: {last}")


def check_yanked(packages):
    names = sorted({n for n, _ in packages})
    yanked = {}
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        for name, result in zip(names, pool.map(lambda n: _safe(yanked_versions, n), names)):
            if isinstance(result, Exception):
                raise result
            yanked[name] = result
    return [(n, v) for n, v in packages if v in yanked[n]]


def _safe(f, arg):
    try:
        return f(arg)
    except Exception as e:
        return e


# --- RustSec advisories ---------------------------------------------------------------------

def parse_version(v):
    """(major, minor, patch, pre) with pre as a tuple that sorts before a release."""
    m = re.match(r"^\s*(\d+)(?:\.(\d+))?(?:\.(\d+))?(?:-([0-9A-Za-z.-]+))?(?:\+\S*)?\s*$", v)
    if not m:
        raise ValueError(f"not a version: {v!r}")
    pre = tuple(int(p) if p.isdigit() else p for p in m.group(4).split(".")) if m.group(4) else None
    return (int(m.group(1)), int(m.group(2) or 0), int(m.group(3) or 0)), pre, m


def vkey(v):
    core, pre, _ = parse_version(v)
    # A pre-release sorts before its release; mixed int/str parts compare as strings.
    return core, (0, tuple(str(p).zfill(10) for p in pre)) if pre else (1, ())


def comparator_matches(comp, version):
    comp = comp.strip()
    m = re.match(r"^(>=|<=|>|<|=|\^|~)?\s*(.+)$", comp)
    op, target = m.group(1) or "^", m.group(2)
    core, _, tm = parse_version(target)
    given = sum(1 for g in (tm.group(1), tm.group(2), tm.group(3)) if g is not None)
    v = vkey(version)
    t = vkey(target)
    if op == ">=":
        return v >= t
    if op == ">":
        return v > t
    if op == "<=":
        return v <= t
    if op == "<":
        return v < t
    if op == "=":
        return v == t
    major, minor, patch = core
    if op == "~":
        upper = (major + 1, 0, 0) if given == 1 else (major, minor + 1, 0)
    else:  # caret: the leftmost non-zero part may not change
        if major > 0 or given == 1:
            upper = (major + 1, 0, 0)
        elif minor > 0 or given == 2:
            upper = (0, minor + 1, 0)
        else:
            upper = (0, 0, patch + 1)
    return v >= t and v < (upper, (0, ()))


def requirement_matches(req, version):
    return all(comparator_matches(c, version) for c in req.split(",") if c.strip())


def affected(advisory, version):
    versions = advisory.get("versions", {})
    for req in versions.get("patched", []) + versions.get("unaffected", []):
        if requirement_matches(req, version):
            return False
    return True


def advisory_db():
    if os.environ.get("HAFEN_ADVISORY_DB"):
        return Path(os.environ["HAFEN_ADVISORY_DB"]), None
    tmp = tempfile.TemporaryDirectory(prefix="advisory-db-")
    try:
        subprocess.run(
            ["git", "clone", "--quiet", "--depth", "1", ADVISORY_REPO, tmp.name],
            check=True,
            timeout=120,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={**os.environ, "GIT_TERMINAL_PROMPT": "0"},
        )
    except Exception:
        tmp.cleanup()
        return None, None
    return Path(tmp.name), tmp


def read_advisory(path):
    text = path.read_text()
    m = re.search(r"```toml\n(.*?)\n```", text, re.S)
    return tomllib.loads(m.group(1)) if m else None


def check_advisories(db, packages):
    findings, warnings = [], []
    by_name = {}
    for name, version in packages:
        by_name.setdefault(name, []).append(version)
    for name, versions in sorted(by_name.items()):
        folder = db / "crates" / name
        if not folder.is_dir():
            continue
        for f in sorted(folder.glob("RUSTSEC-*.md")):
            adv = read_advisory(f)
            if not adv:
                continue
            meta = adv.get("advisory", {})
            if meta.get("withdrawn"):
                continue
            oses = adv.get("affected", {}).get("os")
            if oses and "linux" not in oses:
                continue
            for v in versions:
                if affected(adv, v):
                    entry = (meta.get("id", f.stem), name, v, meta.get("title", "").strip() or first_heading(f))
                    (warnings if meta.get("informational") else findings).append(entry)
    return findings, warnings


def first_heading(path):
    """The advisory's title: the first heading after its TOML block."""
    text = path.read_text()
    end = text.find("```", text.find("```toml") + 7)
    for line in text[end + 3 if end >= 0 else 0 :].splitlines():
        if line.startswith("# "):
            return line[2:].strip()
    return ""


def self_test():
    """The version matching against cases with known answers (Cargo's requirement syntax)."""
    cases = [
        ("^0.4.13", "0.4.13", True), ("^0.4.13", "0.4.20", True), ("^0.4.13", "0.5.0", False),
        ("0.4.13", "0.4.99", True), ("^1.2", "1.9.9", True), ("^1.2", "2.0.0", False),
        (">= 1.0.0, < 1.2.3", "1.2.2", True), (">= 1.0.0, < 1.2.3", "1.2.3", False),
        ("~1.2.3", "1.2.9", True), ("~1.2.3", "1.3.0", False), ("~1", "1.9.0", True),
        ("= 0.3.0", "0.3.0", True), ("= 0.3.0", "0.3.1", False), ("^0.0.3", "0.0.4", False),
        (">= 0.9.4", "0.9.4", True), (">= 0.9.4", "0.9.3", False), ("< 0.1.0", "0.1.0-alpha", True),
        (">= 1.0.0", "1.0.0-rc.1", False), ("> 1.0.0", "1.0.1", True), ("<= 1.0.0", "1.0.1", False),
    ]
    bad = [(r, v, e) for r, v, e in cases if requirement_matches(r, v) != e]
    adv = {"versions": {"patched": [">= 1.2.0"], "unaffected": ["< 1.0.0"]}}
    expect = {"0.9.0": False, "1.0.0": True, "1.1.9": True, "1.2.0": False}
    bad += [("advisory", v, e) for v, e in expect.items() if affected(adv, v) != e]
    for case in bad:
        print(f"dep-audit self-test FAILED: {case}")
    print(f"dep-audit self-test: {len(cases) + len(expect) - len(bad)} of {len(cases) + len(expect)} cases right")
    return 1 if bad else 0


def main():
    if "--self-test" in sys.argv:
        return self_test()
    require_advisories = "--require-advisories" in sys.argv
    packages = locked_packages()
    allow = allowed()
    failed = False
    print(f"dep-audit: {len(packages)} crates.io packages in Cargo.lock")

    try:
        yanked = check_yanked(packages)
    except Exception as e:
        print(f"dep-audit: the crates.io index could not be read: {e}")
        return 2
    for name, version in yanked:
        key = f"yanked:{name}@{version}"
        if key in allow:
            print(f"  allowed  {key}")
        else:
            print(f"  YANKED   {name} {version}: its authors withdrew it; update it (cargo update -p {name})")
            failed = True
    print(f"dep-audit: yanked versions: {len(yanked)}")

    db, tmp = advisory_db()
    if db is None:
        print(
            "dep-audit: WARNING: the RustSec advisory database could not be fetched from "
            f"{ADVISORY_REPO} (no network to GitHub?); advisories were NOT checked. Set "
            "HAFEN_ADVISORY_DB to a checkout of it."
        )
        if require_advisories:
            return 3
    else:
        try:
            findings, warnings = check_advisories(db, packages)
        finally:
            if tmp:
                tmp.cleanup()
        for adv_id, name, version, title in findings:
            if adv_id in allow:
                print(f"  allowed  {adv_id} {name} {version}: {title}")
            else:
                print(f"  VULNERABLE {adv_id} {name} {version}: {title}")
                failed = True
        for adv_id, name, version, title in warnings:
            print(f"  warning  {adv_id} {name} {version}: {title}")
        print(f"dep-audit: advisories: {len(findings)} affecting, {len(warnings)} informational")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
