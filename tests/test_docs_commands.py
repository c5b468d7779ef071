"""Every shell command in README.md and docs/, as written: each names a program this project installs
(or a documented tool), and its subcommands, options and input files exist; a failure names the doc's
file and line. Commands that need nothing but this machine (the auditors' key set-up) run for real;
the others run for real elsewhere in the suite (their behaviour), this checks that the docs call them right."""

import contextlib
import io
import re
import shlex
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest
import typer

from tests.conftest import BIN, ROOT

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PROGRAMS = ("scoft", "prefect", "make", "dvc", "python", "docker", "kubectl", "openssl", "sha256sum", "mkdir")
# an inline `scoft ...` names a command only when a subcommand-like word follows (not `scoft/`, `scoft.model`)
INLINE = re.compile(r"`((?:" + "|".join(PROGRAMS) + r") [a-z<\-.][^`]*)`")
FENCE = re.compile(r"^( *)```(\w*)\n(.*?)^\1```", re.S | re.M)


@dataclass
class Command:
    where: str  # docs/file.md:line
    text: str

    def words(self) -> list[str]:
        """The command as a shell splits it, its environment assignments, optional parts ([--json]) and
        alternatives ([--key PUB.pem | --unsigned]) flattened: each option is checked."""
        text = re.sub(r"\$\([^)]*\)", "", self.text)  # $(git rev-parse ...): a value, not options
        text = re.sub(r"[\[\]|]", " ", text.replace("…", "").replace("...", ""))
        words = [w for w in shlex.split(text, comments=True) if not re.fullmatch(r"[A-Z_]+=\S*", w)]
        return words


def documented_commands() -> list[Command]:
    commands = []
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        name = doc.relative_to(ROOT).as_posix()
        for block in FENCE.finditer(text):
            if block.group(2) not in ("bash", "sh"):
                continue
            first = text[: block.start(3)].count("\n") + 1
            for i, line in enumerate(block.group(3).splitlines()):
                if line.strip() and not line.strip().startswith("#"):
                    commands.append(Command(f"{name}:{first + i}", line.strip()))
        for span in INLINE.finditer(text):
            commands.append(Command(f"{name}:{text[: span.start()].count(chr(10)) + 1}", span.group(1)))
    return commands


COMMANDS = documented_commands()


def _by_program(program: str) -> list[Command]:
    return [c for c in COMMANDS if c.words() and c.words()[0] == program]


def _options(words: list[str]) -> list[str]:
    return [w.split("=")[0] for w in words if w.startswith("-") and w != "-"]


def _placeholder(word: str) -> bool:
    return word.isupper() or word.startswith("<") or word in ("C", "KEY_A", "KEY_B")


def test_every_command_names_a_known_program():
    assert len(COMMANDS) > 60  # the docs' commands were found
    unknown = [f"{c.where}: {c.text}" for c in COMMANDS if not c.words() or c.words()[0] not in PROGRAMS]
    assert not unknown, unknown


def _scoft_command(words: list[str], where: str):
    """The command (typer's, a click command) that `scoft WORDS` runs, and the words left for it."""
    from scoft.cli import app

    command = typer.main.get_command(app)
    path = ["scoft"]
    rest = words[1:]
    while hasattr(command, "commands") and rest and not rest[0].startswith("-"):
        if _placeholder(rest[0]):  # `scoft <command> --params ...`: what the stage commands (base, ...) take
            return command.commands["base"], rest[1:]
        sub = command.commands.get(rest[0])
        assert sub is not None, f"{where}: `{' '.join(path)}` has no command {rest[0]!r}"
        command, path, rest = sub, path + [rest[0]], rest[1:]
    return command, rest


def test_scoft_commands_and_options_exist():
    problems = []
    for c in _by_program("scoft"):
        try:
            command, rest = _scoft_command(c.words(), c.where)
        except AssertionError as e:
            problems.append(str(e))
            continue
        known = {o for p in command.params for o in [*p.opts, *p.secondary_opts]}
        problems += [f"{c.where}: `{c.text}`: no option {o}" for o in _options(rest) if o not in known]
    assert not problems, problems


def _input_files(words: list[str]) -> list[str]:
    """Words naming a file of this repository that the command reads (templates, params, scripts)."""
    return [w for w in words if re.fullmatch(r"[\w./-]+\.(json|yaml|yml|sh|py)", w) and not w.startswith("~")
            and w not in ("params.yaml", "dvc.yaml")]


def test_files_the_commands_read_exist():
    missing = [f"{c.where}: {w}" for c in COMMANDS for w in _input_files(c.words()[1:]) if not (ROOT / w).exists()
               and not (ROOT / w.replace(".", "/", w.count(".") - 1)).exists()]
    assert not missing, missing


def test_make_targets_exist():
    targets = set(re.findall(r"^([a-z][\w-]*):", (ROOT / "Makefile").read_text(), re.M))
    missing = [f"{c.where}: make {w}" for c in _by_program("make") for w in c.words()[1:] if w not in targets]
    assert not missing and _by_program("make"), missing


def test_dvc_commands_parse():
    """DVC's own parser: the command exists, and where the doc gives its arguments, they parse."""
    from dvc.cli import DvcParserError
    from dvc.cli.parser import get_main_parser

    parser = get_main_parser()
    for c in _by_program("dvc"):
        words = c.words()[1:]
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                parser.parse_args(words if len(words) > 1 else [*words, "--help"])
        except SystemExit as e:  # --help of a command that exists
            assert e.code == 0 and len(words) == 1, f"{c.where}: dvc refuses `{c.text}`"
        except DvcParserError:
            pytest.fail(f"{c.where}: dvc refuses `{c.text}`")


def _help(argv: list[str]) -> str:
    done = subprocess.run([*argv, "--help"], capture_output=True, text=True, timeout=120)
    return done.stdout if done.returncode == 0 else f"FAILED ({done.returncode}): {done.stderr[-300:]}"


def _check_options_against_help(commands: list[Command], program: list[str]) -> list[str]:
    """Each command's subcommand --help, once per subcommand (in parallel): it exists, and names every
    option the doc gives it."""
    heads = {c.where: _subcommand(c.words()) for c in commands}
    unique = sorted({tuple(h) for h in heads.values()})
    with ThreadPoolExecutor(4) as pool:
        helps = dict(zip(unique, pool.map(lambda h: _help([*program, *h[1:]]), unique)))
    problems = []
    for c in commands:
        head = heads[c.where]
        text = helps[tuple(head)]
        if text.startswith("FAILED"):
            problems.append(f"{c.where}: `{' '.join(head)} --help` {text}")
            continue
        problems += [f"{c.where}: `{c.text}`: no option {o}" for o in _options(c.words()[len(head):])
                     if not re.search(rf"(?<![\w-]){re.escape(o)}(?![\w-])", text)]
    return problems


def test_prefect_commands_and_options_exist():
    problems = _check_options_against_help(_by_program("prefect"), [str(BIN / "prefect")])
    assert not problems and _by_program("prefect"), problems


def test_bench_scripts_and_their_options_exist():
    problems = []
    for c in _by_program("python"):
        words = c.words()
        script = ROOT / (words[2].replace(".", "/") + ".py" if words[1] == "-m" else words[1])
        if not script.is_file():
            problems.append(f"{c.where}: no script {script.relative_to(ROOT)}")
            continue
        source = script.read_text(encoding="utf-8")
        problems += [f"{c.where}: {script.name} takes no option {o}" for o in _options(words[2:])
                     if f'"{o}"' not in source]
    assert not problems, problems


def _subcommand(words: list[str]) -> list[str]:
    """The program and its subcommand words (up to the first option or argument)."""
    head = [words[0]]
    for w in words[1:]:
        if w.startswith("-") or "/" in w or _placeholder(w) or "=" in w:
            break
        head.append(w)
    return head


@pytest.mark.parametrize("program", ["docker", "kubectl"])
def test_cluster_tool_commands_and_options_exist(program):
    """For operators' cluster set-up (docs/operators.md): the client's own --help; no engine or cluster."""
    if shutil.which(program) is None:
        pytest.skip(f"{program} is not installed here")
    problems = _check_options_against_help(_by_program(program), [program])
    assert not problems, problems


def test_the_auditors_key_commands_run_as_written(tmp_path):
    """The signing key set-up of docs/auditors.md, line by line in a fresh home and folder."""
    (block,) = [b.group(3) for b in FENCE.finditer((ROOT / "docs/auditors.md").read_text()) if "openssl" in b.group(3)]
    home = tmp_path / "home"
    home.mkdir()
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=tmp_path, capture_output=True, text=True,
                          env={"HOME": str(home), "PATH": "/usr/bin:/bin"}, timeout=60)
    assert done.returncode == 0, done.stderr
    assert (home / ".config/scoft/signing-key.pem").is_file() and (tmp_path / "keys/scoft-verify.pem").is_file()
    assert re.match(r"[0-9a-f]{64}  keys/scoft-verify.pem", done.stdout)  # what goes into lineage.verify_key_sha256
