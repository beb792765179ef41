"""The course kit (course.py, course/): every listed wrong implementation fails its grading tests; `make` writes a
student copy that works except for the blanked functions; `grade` scores one assignment at a time, in isolation when
it grades another folder; bad input is a one-line error with exit status 2."""
import ast
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from course.assignments import ASSIGNMENTS, BY_NAME
from course.mutants import MUTANTS
from course.tool import find_function, is_stub, main, run_tests, splice

ROOT = Path(__file__).resolve().parents[1]
REQUIRED = {"recurrent_delta_rule", "chunked_delta_rule", "token_entropy", "smooth_entropy", "select_positions",
            "cosine_reward", "binary_reward", "hybrid_reward", "group_advantages", "policy_loss", "aggregate",
            "sample_from_snapshots", "logprobs_from_snapshots", "fast_weight_update", "newton_schulz5"}


def course(*args, cwd=ROOT):
    """Runs `python course.py ARGS` in cwd -> (exit status, stdout lines, stderr)."""
    p = subprocess.run([sys.executable, "course.py", *args], cwd=cwd, capture_output=True, text=True)
    return p.returncode, p.stdout.splitlines(), p.stderr


def test_table_names_functions_tests_and_wrong_versions():
    assert REQUIRED <= set(BY_NAME) and set(MUTANTS) == set(BY_NAME)
    for a in ASSIGNMENTS:
        tree = ast.parse((ROOT / a.file).read_text())
        for fn in a.blanked:
            assert find_function(tree, fn) is not None, (a.name, fn)
        assert set(a.needs) <= set(BY_NAME) and a.points > 0 and a.tests
        assert len(MUTANTS[a.name]) >= 3, a.name
        assert {m[0] for m in MUTANTS[a.name]} <= set(a.blanked), a.name
        assert all((ROOT / t.split("::")[0]).is_file() for t in a.tests), a.name
    done = set()  # a student can finish them in some order: "needs" has no cycle
    while len(done) < len(ASSIGNMENTS):
        ready = {a.name for a in ASSIGNMENTS if a.name not in done and set(a.needs) <= done}
        assert ready, f"cycle in needs among {set(BY_NAME) - done}"
        done |= ready


def test_every_wrong_implementation_is_caught():
    """One process: the reference passes each assignment's grading tests, and each mutant fails at least one."""
    p = subprocess.run([sys.executable, "-m", "course.mutants"], cwd=ROOT, capture_output=True, text=True)
    lines = p.stdout.splitlines()
    assert p.returncode == 0, "\n".join(ln for ln in lines if not ln.startswith("caught")) + p.stderr
    caught = Counter(ln.split()[1] for ln in lines if ln.startswith("caught"))
    assert caught == {name: len(m) for name, m in MUTANTS.items()}


def test_make_a_student_copy_and_grade_it_there(tmp_path):
    dst = tmp_path / "student"
    assert main(["make", str(dst), "--only", "token_entropy,chunked_delta_rule"]) == 0
    names = {str(p.relative_to(dst)) for p in dst.rglob("*") if p.is_file()}
    assert "ASSIGNMENTS.md" in names and "course.py" in names and "tests/test_course_grading.py" in names
    assert not {n for n in names if n.split("/")[0] in (".git", "results", "out")}
    assert "course/mutants.py" not in names and "tests/test_course.py" not in names   # near-solutions stay home
    assert (dst / "course/assigned.txt").read_text().split() == ["token_entropy", "chunked_delta_rule"]
    for file, fn in [("entropy.py", "token_entropy"), ("kernels/chunked.py", "chunked_delta_rule"),
                     ("kernels/chunked.py", "_chunked")]:
        src, ref = (dst / file).read_text(), (ROOT / file).read_text()
        assert is_stub(src, fn) and not is_stub(ref, fn)
        mine, theirs = find_function(ast.parse(src), fn), find_function(ast.parse(ref), fn)
        assert ast.get_docstring(mine) == ast.get_docstring(theirs)                   # what to implement stays
        assert [a.arg for a in mine.args.args] == [a.arg for a in theirs.args.args]
    assert not is_stub((dst / "entropy.py").read_text(), "smooth_entropy")
    assert "`token_entropy`" in (dst / "ASSIGNMENTS.md").read_text()
    # the student's side: the copy's own grader, on what is there; smooth_entropy was not blanked and still works
    rc, out, _ = course("grade", "--only", "token_entropy,smooth_entropy,chunked_delta_rule", cwd=dst)
    assert rc == 1, out
    assert out[0] == "token_entropy  0/3  0/1 points" and "NotImplementedError: assignment token_entropy" in out[1]
    assert "smooth_entropy  3/3  1/1 points" in out and "chunked_delta_rule  0/45  0/4 points" in out
    assert out[-1] == "score: 1/6"


def test_grading_another_folder_isolates_each_assignment(tmp_path):
    """A copy where hybrid_reward is solved but cosine_reward (which hybrid_reward calls) is not: graded from the
    repository, hybrid_reward gets its points, because every other function comes from the repository."""
    dst = tmp_path / "student"
    assert main(["make", str(dst), "--only", "cosine_reward,hybrid_reward"]) == 0
    solved = splice((dst / "reward.py").read_text(), (ROOT / "reward.py").read_text(), BY_NAME["hybrid_reward"])
    (dst / "reward.py").write_text(solved)
    assert is_stub((dst / "reward.py").read_text(), "cosine_reward")
    rc, out, _ = course("grade", str(dst), "--only", "hybrid_reward")
    assert (rc, out) == (0, ["hybrid_reward  3/3  1/1 points", "score: 1/1"])


def test_grade_the_repository_scores_full_marks():
    rc, out, _ = course("grade", "--only", "binary_reward,newton_schulz5")
    assert (rc, out) == (0, ["binary_reward  2/2  1/1 points", "newton_schulz5  1/1  1/1 points", "score: 2/2"])


def test_splice_takes_the_students_function_and_imports_or_says_why():
    a = BY_NAME["token_entropy"]
    base = (ROOT / "entropy.py").read_text()
    theirs = "import math\n\n\ndef token_entropy(logits):\n    return math.pi\n"
    out = splice(base, theirs, a)
    assert "import math\n" in out and "    return math.pi\n" in out and "logp = F.log_softmax" not in out
    assert "def smooth_entropy" in out and out.count("def token_entropy") == 1
    for src, why in [("def other():\n    pass\n", "entropy.py has no def token_entropy"),
                     ("def token_entropy(:\n", "entropy.py does not parse")]:
        out = splice(base, src, a)
        assert is_stub(out, "token_entropy") and why in out


def test_a_test_file_that_does_not_import_leaves_the_others_running(tmp_path):
    """pytest stops a whole run when a node id on its command line cannot be collected; the grader must not."""
    shutil.copytree(ROOT / "course", tmp_path / "course", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "broken.py").write_text("def f(:\n")
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests/test_a.py").write_text("import broken\n\n\ndef test_a():\n    pass\n")
    (tmp_path / "tests/test_b.py").write_text("import pytest\n\n\n@pytest.mark.parametrize('x', [1, 2])\n"
                                              "def test_b(x):\n    assert x == 1\n\n\ndef test_other():\n    pass\n")
    results = run_tests(tmp_path, ["tests/test_a.py::test_a", "tests/test_b.py::test_b"])
    assert results == {"tests/test_a.py::test_a": "not collected: SyntaxError: invalid syntax (broken.py line 1)",
                       "tests/test_b.py::test_b[1]": None, "tests/test_b.py::test_b[2]": "assert 2 == 1"}


@pytest.mark.parametrize("args, message", [
    (["grade", "--only", "entropy"], "unknown assignment entropy; valid: recurrent_delta_rule"),
    (["grade", "no/such/folder"], "no/such/folder is not a folder"),
    (["make", "."], "exists and is not an empty folder"),
    (["make", "x", "--only", ""], "unknown assignment"),
    (["frobnicate"], "invalid choice"),
])
def test_bad_input_is_one_line_and_exit_2(args, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT if args[:2] == ["make", "."] else tmp_path)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
