"""The course commands: list the assignments, make a student copy, grade a copy one assignment at a time.

Grading DIR from the repository that holds this file (BASE): when DIR is another folder, each assignment is graded
in isolation: a scratch copy of BASE gets DIR's version of that assignment's functions (and DIR's module-level
imports), and only that assignment's tests run there, so every other function they touch is BASE's own. When DIR is
BASE (the default, and what a student runs inside a copy) the tests run once, on what is there.
"""
import argparse
import ast
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

from course.assignments import ASSIGNMENTS, BY_NAME
from course.pick import wanted

BASE = Path(__file__).resolve().parents[1]
SKIP_DIRS = {".git", "results", "out", "__pycache__", ".pytest_cache"}
INSTRUCTOR_ONLY = {"course/mutants.py", "tests/test_course.py"}  # wrong implementations (near-solutions)
ASSIGNED = "course/assigned.txt"  # the assignments of a student copy, one name a line


class Bad(Exception):
    """Bad input: printed as one line, exit status 2."""


# ---------------------------------------------------------------------------------------------- files and sources

def repo_files(root):
    """The files of a checkout, relative paths: git's tracked and untracked-but-not-ignored files when root is a git
    checkout, else a walk; never .git, results/, out/, caches."""
    try:
        out = subprocess.run(["git", "-C", str(root), "ls-files", "--cached", "--others", "--exclude-standard"],
                             capture_output=True, text=True, check=True).stdout.split("\n")
    except (OSError, subprocess.CalledProcessError):
        out = [str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()]

    def kept(f):  # not under .git, results/, out/, out-*/ or a cache
        dirs = Path(f).parts[:-1]
        return not SKIP_DIRS & set(dirs) and not any(d.startswith("out-") for d in dirs) and (root / f).is_file()
    return sorted(f for f in out if f and kept(f))


def copy_files(src, dst, files):
    for f in files:
        (dst / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src / f, dst / f)


def find_function(tree, name):
    """The top-level def `name` (or "Class.method") of a parsed module, or None."""
    body = tree.body
    *owners, name = name.split(".")
    for owner in owners:
        body = next((n.body for n in body if isinstance(n, ast.ClassDef) and n.name == owner), [])
    return next((n for n in body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == name),
                None)


def span(node):
    """1-based (first, last) line of a def, decorators included."""
    return min([node.lineno] + [d.lineno for d in node.decorator_list]), node.end_lineno


def has_docstring(node):
    first = node.body[0]
    return isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str)


def is_stub(src, name):
    """True when def `name` in src is only (a docstring and) `raise NotImplementedError(...)`."""
    node = find_function(ast.parse(src), name)
    body = node.body[1:] if node is not None and has_docstring(node) else (node.body if node else [])
    return len(body) == 1 and isinstance(body[0], ast.Raise) and "NotImplementedError" in ast.unparse(body[0])


def replace_lines(src, edits):
    """edits: {(first, last): new text} on 1-based line ranges that do not overlap."""
    lines = src.splitlines(keepends=True)
    for (first, last), text in sorted(edits.items(), reverse=True):
        lines[first - 1:last] = [text]
    return "".join(lines)


def stub(src, node, a, fn, why=None):
    """The def with its header and docstring kept and its body replaced by a comment saying what to implement and
    `raise NotImplementedError` naming the assignment (and `why`, when given)."""
    lines = src.splitlines(keepends=True)
    first, last = span(node)
    keep_to = node.body[0].end_lineno if has_docstring(node) else node.body[0].lineno - 1
    pad = " " * node.body[0].col_offset
    if fn == a.name:
        note = f"Assignment {a.name}: {a.paper}. {a.todo}"
        msg = f"assignment {a.name}"
    else:
        note = f"Part of assignment {a.name}: a helper of {a.name}; implement it, or do the work in {a.name}."
        msg = f"assignment {a.name} (its helper {fn})"
    msg = f"{why}: {msg}" if why else msg
    comment = "".join(f"{pad}# {line}\n" for line in textwrap.wrap(note, 116 - len(pad)))
    return "".join(lines[first - 1:keep_to]) + comment + f"{pad}raise NotImplementedError({msg!r})\n"


def blank(src, a, names):
    """src with every function of `names` (all of assignment a) blanked."""
    tree = ast.parse(src)
    nodes = {fn: find_function(tree, fn) for fn in names}
    return replace_lines(src, {span(n): stub(src, n, a, fn) for fn, n in nodes.items()})


def splice(base_src, dir_src, a):
    """BASE's module source with assignment a's functions taken from DIR's source (a stub naming the reason when DIR
    lacks them), and DIR's module-level imports that BASE does not have added after BASE's first import."""
    base_tree = ast.parse(base_src)
    try:
        dir_tree, why = ast.parse(dir_src), None
    except SyntaxError as e:
        dir_tree, why = None, f"{a.file} does not parse: {e.msg} (line {e.lineno})"
    dir_lines = dir_src.splitlines(keepends=True)
    edits = {}
    for fn in a.blanked:
        node = find_function(base_tree, fn)
        theirs = find_function(dir_tree, fn) if dir_tree else None
        if theirs is None:
            text = stub(base_src, node, a, fn, why or f"{a.file} has no def {fn}")
        else:
            first, last = span(theirs)
            text = textwrap.indent(textwrap.dedent("".join(dir_lines[first - 1:last])), " " * node.col_offset)
        edits[span(node)] = text
    imports = [ast.get_source_segment(dir_src, n) for n in (dir_tree.body if dir_tree else [])
               if isinstance(n, (ast.Import, ast.ImportFrom))]
    have = {ast.get_source_segment(base_src, n) for n in base_tree.body if isinstance(n, (ast.Import, ast.ImportFrom))}
    extra = "".join(f"{imp}\n" for imp in imports if imp not in have)
    first_import = next((n.lineno for n in base_tree.body if isinstance(n, (ast.Import, ast.ImportFrom))), None)
    out = replace_lines(base_src, edits)
    if extra and first_import:
        lines = out.splitlines(keepends=True)
        out = "".join(lines[:first_import - 1]) + extra + "".join(lines[first_import - 1:])
    return out


# ---------------------------------------------------------------------------------------------- running tests

def run_tests(root, selectors):
    """Runs pytest on `selectors` in root. -> {node id: None (passed) or the one-line reason it failed}; a selector
    that collected nothing maps to the reason (e.g. its test file does not import)."""
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "report.xml"
        files = dict.fromkeys(s.split("::")[0] for s in selectors)       # course.pick keeps the selected tests
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "course.pick", f"--rootdir={root}",
               "--continue-on-collection-errors", "-o", "junit_family=xunit1", f"--junitxml={xml}", *files]
        env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "COURSE_TESTS": "\n".join(selectors)}
        proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, env=env)
        if not xml.exists():
            tail = (proc.stdout + proc.stderr).strip().splitlines()
            return {s: "pytest did not run: " + (tail[-1] if tail else f"exit {proc.returncode}") for s in selectors}
        cases = ET.parse(xml).getroot().iter("testcase")
    results, broken = {}, []
    for case in cases:
        cls, name = case.get("classname", ""), case.get("name", "")
        bad = next((e for e in case if e.tag in ("failure", "error", "skipped")), None)
        reason = None if bad is None else first_line(bad)
        if not cls:  # a collection error: name is the test module ("tests.test_x")
            broken.append((name.replace(".", "/") + ".py", reason))
            continue
        results[cls.replace(".", "/") + ".py::" + name] = reason
    for s in selectors:
        if not any(matches(n, s) for n in results):
            why = next((r for f, r in broken if s.startswith(f)), "no test collected")
            results[s] = f"not collected: {why}"
    return results


def first_line(element):
    """The one-line reason of a junit failure/error element: its message, else the last 'E ' line of its text."""
    text = (element.get("message") or "").strip()
    if not text or text == "collection failure":
        lines = [ln[1:].strip() for ln in (element.text or "").splitlines() if ln.startswith("E ")]
        where = [m.groups() for m in map(re.compile(r'File "(.+)", line (\d+)').search, lines) if m]
        text = (lines[-1] if lines else text or element.tag) + (
            f" ({Path(where[-1][0]).name} line {where[-1][1]})" if where else "")
    line = text.splitlines()[0] if text else element.tag
    return ("skipped: " if element.tag == "skipped" else "") + (line[:157] + "..." if len(line) > 160 else line)


def plural(n, word):
    return f"{n} {word}{'s' * (n != 1)}"


def matches(node_id, selector):
    return wanted(node_id, [selector])


# ---------------------------------------------------------------------------------------------- commands

def chosen(names, folder=None):
    """--only NAMES, else the assignments recorded in a student copy, else all of them."""
    if names is None and folder is not None and (folder / ASSIGNED).is_file():
        names = ",".join((folder / ASSIGNED).read_text().split())
    if names is None:
        return list(ASSIGNMENTS)
    picked = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in picked if n not in BY_NAME]
    if unknown or not picked:
        raise Bad(f"unknown assignment {', '.join(unknown) or repr(names)}; valid: {', '.join(BY_NAME)}")
    return [BY_NAME[n] for n in picked]


def cmd_list(_args):
    for a in ASSIGNMENTS:
        files = {}  # file -> test -> its selected parametrisations ([] = all)
        for t in a.tests:
            file, test = t.split("::")
            name, _, param = test.partition("[")
            files.setdefault(file, {}).setdefault(name, []).extend([param[:-1]] if param else [])
        graded = "; ".join(f + "::" + ", ".join(n + (f"[{'|'.join(ps)}]" if ps else "") for n, ps in tests.items())
                           for f, tests in files.items())
        print(f"{a.name}  {a.file}  {a.paper}  {plural(a.points, 'point')}  graded by: {graded}"
              + (f"  needs: {', '.join(a.needs)}" if a.needs else ""))
    print(f"{len(ASSIGNMENTS)} assignments, {sum(a.points for a in ASSIGNMENTS)} points; test ids: "
          "course/assignments.py")
    return 0


def cmd_make(args):
    dst = Path(args.dir).resolve()
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise Bad(f"{args.dir} exists and is not an empty folder; give a new or empty folder")
    if BASE == dst or BASE in dst.parents:
        raise Bad(f"{args.dir} lies inside the repository; give a folder outside it")
    picked = chosen(args.only)
    dst.mkdir(parents=True, exist_ok=True)
    copy_files(BASE, dst, [f for f in repo_files(BASE) if f not in INSTRUCTOR_ONLY])
    for file in dict.fromkeys(a.file for a in picked):
        src = (dst / file).read_text()
        for a in picked:
            if a.file == file:
                src = blank(src, a, a.blanked)
        (dst / file).write_text(src)
    (dst / ASSIGNED).write_text("".join(f"{a.name}\n" for a in picked))
    (dst / "ASSIGNMENTS.md").write_text(assignments_md(picked))
    points = plural(sum(a.points for a in picked), "point")
    print(f"wrote {args.dir}: {plural(len(picked), 'assignment')} ({points}) blanked; "
          f"instructions in {args.dir}/ASSIGNMENTS.md; grade with: cd {args.dir} && python course.py grade")
    return 0


def assignments_md(picked):
    names = {a.name for a in picked}
    rows = "".join(f"| `{a.name}` | `{a.file}` | {a.paper} | {a.points} | "
                   f"{', '.join(n for n in a.needs if n in names) or '-'} |\n" for a in picked)
    parts = "".join(f"\n### `{a.name}` ({plural(a.points, 'point')})\n\n{a.todo}\n\nGraded by: "
                    + ", ".join(f"`{t}`" for t in a.tests) + "\n" for a in picked)
    return f"""# Assignments

In each function below the body is replaced by `raise NotImplementedError`; its signature and docstring (and the
docstring at the top of its file) say what to compute: the shapes and the equation. Write the body; keep the
signature. Helpers you add belong inside the function (module-level imports are fine).

Grade your work with `python course.py grade` (all of them) or `python course.py grade --only NAME`: one line
`NAME  PASSED/TOTAL  POINTS/MAX points` per assignment, the reason of each failure under it, then the score. An
assignment earns its points when all its tests pass. "needs": its tests run those assignments' functions too (the tiny
models run the delta rule and the LaCT update), so do those first. Your instructor grades each function on its own,
with every other function taken from the full repository.

| assignment | file | implements | points | needs |
|---|---|---|---|---|
{rows}{parts}"""


def cmd_grade(args):
    folder = Path(args.dir).resolve() if args.dir else BASE
    if not folder.is_dir():
        raise Bad(f"{args.dir} is not a folder; give a copy made by `python course.py make DIR`, or none for this repo")
    picked = chosen(args.only, folder)
    missing = [a.file for a in picked if not (folder / a.file).is_file()]
    if missing:
        raise Bad(f"{args.dir} has no {', '.join(dict.fromkeys(missing))}: not a copy of this repository")
    if folder == BASE:
        results = run_tests(BASE, [t for a in picked for t in a.tests])
        per = {a.name: results for a in picked}
    else:
        per = {}
        with tempfile.TemporaryDirectory() as tmp:
            scratch = Path(tmp)
            copy_files(BASE, scratch, [f for f in repo_files(BASE) if f not in INSTRUCTOR_ONLY])
            for a in picked:
                original = (scratch / a.file).read_text()
                (scratch / a.file).write_text(splice(original, (folder / a.file).read_text(), a))
                per[a.name] = run_tests(scratch, list(a.tests))
                (scratch / a.file).write_text(original)
    earned = 0
    for a in picked:
        own = {n: r for n, r in per[a.name].items() if any(matches(n, s) for s in a.tests)}
        passed = sum(r is None for r in own.values())
        points = a.points if passed == len(own) else 0
        earned += points
        print(f"{a.name}  {passed}/{len(own)}  {points}/{a.points} points")
        reasons = Counter(r for r in own.values() if r is not None)
        for reason, count in reasons.items():
            example = next(n for n, r in own.items() if r == reason)
            print(f"    {count} failed ({example}): {reason}")
        if folder == BASE and passed < len(own):
            todo = [n for n in a.needs if is_stub((BASE / BY_NAME[n].file).read_text(), n)]
            if todo:
                print(f"    these tests also run {', '.join(todo)}, still NotImplementedError here: do them first")
    total = sum(a.points for a in picked)
    print(f"score: {earned}/{total}")
    return 0 if earned == total else 1


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse's own prints the usage too)
        raise Bad(f"{message} (usage: python course.py list | make DIR [--only NAME,...] | grade [DIR] "
                  "[--only NAME,...])")


def main(argv=None):
    p = Parser(prog="course.py", description="Course assignments made from this repository, graded by its tests.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)
    sub.add_parser("list", help="the assignments: name, file, equation, points, grading tests")
    m = sub.add_parser("make", help="write a student copy to DIR with the assignments' bodies blanked")
    m.add_argument("dir")
    m.add_argument("--only", help="comma-separated assignment names (default: all)")
    g = sub.add_parser("grade", help="grade DIR (default: this repository), one assignment at a time")
    g.add_argument("dir", nargs="?")
    g.add_argument("--only", help="comma-separated assignment names (default: all, or the copy's own)")
    try:
        args = p.parse_args(argv)
        return {"list": cmd_list, "make": cmd_make, "grade": cmd_grade}[args.command](args)
    except Bad as e:
        print(f"course.py: error: {e}", file=sys.stderr)
        return 2
