"""Every command line the documents show still parses: each `python`, `torchrun` and `pip` line in a
fenced block of README.md and docs/*.md, read with its own program's argument parser (nothing runs).

The placeholders (MODEL, DIR, FILE, REC.hea, ...) become files and folders in a temporary folder,
made where a parser checks that they exist. A failure names the document and line; a renamed or
removed flag, a bad value, a script that is gone, or a flag spelled otherwise than the script's
--help shows it (`--bp-batch` for `--bp_batch`) all fail."""
import contextlib
import io
import logging
import re
import shlex
from pathlib import Path

import pytest

import benchmark
import main
import predict

log = logging.getLogger("tests.documented_commands")

REPO_ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
PROGRAMS = ("python", "torchrun", "pip")
# The documents' stand-ins and what each becomes here (paths are relative to a temporary folder).
PLACEHOLDERS = {"MODEL": "model.pt", "DIR": "records", "FILE": "file", "REC": "record", "STUDENT": "lbitmix-tiny",
                "S": "18"}
# Flags whose value a parser checks on disk: made as a file when its name has a suffix, else as a folder
INPUT_FLAGS = ("--model", "--records", "--teacher", "--calibrate", "--student_model")


def documented_commands():
    """(document, line number, words) of every command line in a fenced block: backslash
    continuations joined, a shell prompt `$ ` and comments dropped, `a && b` taken as two."""
    found = []
    for document in DOCUMENTS:
        lines, fenced, i = document.read_text().splitlines(), False, 0
        while i < len(lines):
            start, text = i, lines[i]
            i += 1
            if text.lstrip().startswith("```"):
                fenced = not fenced
                continue
            while fenced and text.rstrip().endswith("\\") and i < len(lines):
                text = text.rstrip()[:-1] + " " + lines[i].strip()
                i += 1
            text = text.strip().removeprefix("$ ")
            if not fenced or text.split(" ", 1)[0] not in PROGRAMS:
                continue
            words, part = shlex.split(text, comments=True), []
            for word in [*words, "&&"]:
                if word != "&&":
                    part.append(word)
                    continue
                if part and part[0] in PROGRAMS:
                    found.append((document.relative_to(REPO_ROOT), start + 1, part))
                part = []
    return found


COMMANDS = documented_commands()


def with_placeholders(words):
    pattern = re.compile(r"\b(" + "|".join(PLACEHOLDERS) + r")\b")
    return [pattern.sub(lambda m: PLACEHOLDERS[m.group(1)], word) for word in words]


def make_inputs(argv, folder):
    """The files and folders the parsers check, made under `folder` where the command names them
    (every value of such a flag, up to the next flag)."""
    flag = None
    for value in argv:
        if value.startswith("-"):
            flag = value
        elif flag in INPUT_FLAGS:
            path = folder / value
            if path.suffix:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.touch()
            else:
                path.mkdir(parents=True, exist_ok=True)


def script_parser(script):
    """(parser, parse(parser, argv)) of one of the repository's scripts: its flags and every check
    that comes before any work."""
    if script in main.SCRIPT_FLAGS:
        return main.build_parser(script), main.settings_from
    if script == "predict.py":
        return predict.build_parser(), lambda parser, argv: predict.check_flags(parser, parser.parse_args(argv))
    if script == "benchmark.py":
        return benchmark.build_parser(), lambda parser, argv: benchmark.check_flags(parser, parser.parse_args(argv))
    return None, None


def parse_script(script, argv, where):
    assert (REPO_ROOT / script).is_file(), f"{where}: {script} does not exist"
    parser, parse = script_parser(script)
    assert parser is not None, f"{where}: no parser known for {script}; add it to script_parser in this test"
    shown = {flag for action in parser._actions for flag in action.option_strings}
    for word in argv:
        flag = word.split("=", 1)[0]
        if flag.startswith("--") and flag not in shown:
            known = parser.known_spelling(flag)
            hint = f"--help spells it {known}" if known in shown else "renamed or removed?"
            pytest.fail(f"{where}: {flag} is not a flag of {script} as its --help shows them ({hint})")
    errors = io.StringIO()
    with contextlib.redirect_stderr(errors), contextlib.redirect_stdout(io.StringIO()):
        try:
            parse(parser, argv)
        except SystemExit as stop:
            assert stop.code == 0 and "--help" in argv, f"{where}: {errors.getvalue().strip()}"


def parse_torchrun(argv, where):
    import torch.distributed

    if not torch.distributed.is_available():
        pytest.skip(f"{where}: this torch has no torch.distributed, whose parser reads torchrun's flags")
    from torch.distributed.run import get_args_parser

    errors = io.StringIO()
    with contextlib.redirect_stderr(errors):
        try:
            args = get_args_parser().parse_args(argv)
        except SystemExit:
            pytest.fail(f"{where}: {errors.getvalue().strip()}")
    parse_script(args.training_script, args.training_script_args, where)


def parse_pip(argv, where):
    try:
        from pip._internal.commands import create_command
    except ImportError:
        pytest.skip(f"{where}: pip's own parser (pip._internal) is not importable here, so the line is not checked")
    errors = io.StringIO()
    with contextlib.redirect_stderr(errors):
        try:
            options, _ = create_command(argv[0]).parse_args(argv[1:])
        except SystemExit:
            pytest.fail(f"{where}: {errors.getvalue().strip()}")
    for requirements in getattr(options, "requirements", []):
        assert (REPO_ROOT / requirements).is_file(), f"{where}: {requirements} is not in the repository"


def parse_pytest(argv, where):
    try:
        from _pytest.config import get_config
        pytest_parser = get_config()._parser
    except (ImportError, AttributeError):
        pytest.skip(f"{where}: pytest's own parser is not reachable here, so the line is not checked")
    try:
        pytest_parser.parse(argv)
    except pytest.UsageError as error:
        pytest.fail(f"{where}: {error}")


@pytest.mark.parametrize("document, line, words", COMMANDS,
                         ids=[f"{document}:{line} {' '.join(words[:2])}" for document, line, words in COMMANDS])
def test_documented_command_parses(document, line, words, tmp_path, monkeypatch):
    where = f"{document}:{line}: `{shlex.join(words)}`"
    program, *argv = with_placeholders(words)
    monkeypatch.chdir(tmp_path)
    make_inputs(argv, tmp_path)
    if program == "torchrun":
        parse_torchrun(argv, where)
    elif program == "pip":
        parse_pip(argv, where)
    elif argv[:2] == ["-m", "pytest"]:
        parse_pytest(argv[2:], where)
    elif argv[:2] == ["-m", "pip"]:
        parse_pip(argv[2:], where)
    else:
        assert argv and not argv[0].startswith("-"), f"{where}: no parser known for python {shlex.join(argv[:2])}"
        parse_script(argv[0], argv[1:], where)


def test_the_documents_show_commands():
    """The collection above finds the commands (an empty list would make every check vacuous)."""
    by_document = {}
    for document, _, _ in COMMANDS:
        by_document[document] = by_document.get(document, 0) + 1
    log.info("documented command lines: %d (%s)", len(COMMANDS),
             ", ".join(f"{document}: {count}" for document, count in by_document.items()))
    assert Path("README.md") in by_document and len(by_document) > 1, by_document
