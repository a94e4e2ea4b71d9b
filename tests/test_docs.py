"""README, the docs and the command line agree; the docs stand alone.

Every command a reader can copy from README.md or docs/*.md (fenced and indented code blocks,
inline code) is read without running it:

* each ``--flag`` exists in that command's argparse parser (``gitjax.cli.build_parser`` for
  ``gitjax``; the parsers of ``gitjax.study`` and ``gitjax.train`` captured from their ``main``;
  ``add_argument`` calls read from the source of the ``experiments/`` and ``benchmarks/`` scripts,
  which are not imported because importing a script runs it);
* each preset, attack, victim, dataset, defence (and ``--defense-arg`` key), generator, split,
  experiment and benchmark named after a flag is registered, and a value of a flag with
  ``choices`` is one of them;
* a usage hint ``[--flag VALUE]`` shows the parser's default; a flag that takes several values
  (``nargs="+"``) is not shown with a comma-separated list;
* every flag of every ``gitjax`` subcommand appears in README.md;
* the commands in the docstrings of gitjax/, experiments/ and benchmarks/ pass the same
  flag and name checks (their ``[--flag VALUE]`` may show an example rather than the default).

The docs also link only to files inside the repository, name no absolute temporary folder
(nor does any file of the package), and state the conditions of a measurement (machine, date)
instead of the circumstances of a past session. No subprocess; a few seconds in all.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import re
from pathlib import Path
from typing import Any, Callable
from unittest import mock

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_UNKNOWN = object()  # a default that is not a literal in the source


# ----------------------------------------------------------------------------- parser specs


@dataclasses.dataclass(frozen=True)
class Opt:
    """What the docs may show of one option: how many values it takes, its choices and default."""

    nargs: Any  # 0 (a switch), None (one value), an int, "?", "+" or "*"
    choices: tuple | None
    default: Any


Spec = dict  # option string -> Opt


def _spec_of(parser: argparse.ArgumentParser) -> Spec:
    spec = {}
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            continue
        for s in a.option_strings:
            if s.startswith("--") and s != "--help":
                spec[s] = Opt(a.nargs, tuple(a.choices) if a.choices is not None else None, a.default)
    return spec


def _literal(node: ast.AST) -> Any:
    try:
        return ast.literal_eval(node)
    except ValueError:
        return _UNKNOWN


@functools.lru_cache(maxsize=None)
def _script_spec(path: Path) -> Spec:
    """The options a script's ``add_argument`` calls declare, read from its source."""
    spec = {}
    for node in ast.walk(ast.parse(path.read_text())):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr == "add_argument"):
            continue
        names = [a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
        kw = {k.arg: _literal(k.value) for k in node.keywords}
        nargs = 0 if kw.get("action") in ("store_true", "store_false") else kw.get("nargs")
        choices = kw.get("choices")
        choices = tuple(choices) if isinstance(choices, (tuple, list)) else None
        default = kw.get("default", False if nargs == 0 else None)
        for n in names:
            if n.startswith("--"):
                spec[n] = Opt(nargs, choices, default)
    return spec


class _Captured(Exception):
    pass


@functools.lru_cache(maxsize=None)
def _captured_spec(module: str) -> Spec:
    """The parser a package ``main(argv)`` builds, taken at its first parse (nothing runs)."""
    import importlib

    main = importlib.import_module(module).main
    seen = []

    def grab(self, *args, **kwargs):
        seen.append(self)
        raise _Captured

    with mock.patch.object(argparse.ArgumentParser, "parse_known_args", grab):
        with pytest.raises(_Captured):
            main([])
    return _spec_of(seen[0])


@functools.lru_cache(maxsize=None)
def _subparsers() -> dict[str, argparse.ArgumentParser]:
    """``gitjax.cli.build_parser()`` as {"": the top-level parser, subcommand: its parser}."""
    from gitjax.cli import build_parser

    parser = build_parser()
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {"": parser, **subs.choices}


@functools.lru_cache(maxsize=None)
def _gitjax() -> tuple[Spec, dict[str, Spec]]:
    parsers = _subparsers()
    return _spec_of(parsers[""]), {name: _spec_of(p) for name, p in parsers.items() if name}


# ----------------------------------------------------------------------------- registries


@functools.lru_cache(maxsize=None)
def _domains() -> dict[str, frozenset]:
    """Flag -> the names it accepts, from the registries (used where the parser has no choices)."""
    from gitjax.attacks import ATTACKS
    from gitjax.configs import PRESETS
    from gitjax.data import SPLITS, list_datasets
    from gitjax.defenses import DEFENSES
    from gitjax.study import METHODS
    from gitjax.victims import list_victims

    victims = frozenset(list_victims())
    kinds = frozenset(_gitjax()[1]["train-prior"]["--generator"].choices)
    return {"--preset": frozenset(PRESETS), "--method": frozenset(ATTACKS), "--methods": frozenset(METHODS),
            "--victim": victims, "--victims": victims, "--models": victims, "--data": frozenset(list_datasets()),
            "--defense": frozenset(DEFENSES), "--generator": kinds, "--kinds": kinds, "--split": frozenset(SPLITS)}


@functools.lru_cache(maxsize=None)
def _experiments() -> frozenset:
    from gitjax.study import load_experiments

    return frozenset(load_experiments()) | {"all", "list"}


def _benchmarks() -> frozenset:
    return frozenset(p.stem for p in (ROOT / "benchmarks").glob("*.py"))


# ----------------------------------------------------------------------------- reading the docs

_PROGRAM = re.compile(r"(?<![\w./-])(gitjax|python3? -m [\w.]+|python3? \S*benchmarks/\S+?\.py)(?=\s|$)")
_PLACEHOLDER = re.compile(r"[A-Z][A-Z0-9_]*|.*<[^>]*>.*|\.\.\.?|…")


def _is_placeholder(tok: str) -> bool:
    return bool(_PLACEHOLDER.fullmatch(tok))


def commands(text: str) -> list[str]:
    """The commands in a markdown text: code lines (fenced, except python, and indented) and inline code."""
    found, prose, fence = [], [], None
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        m = re.match(r"\s*(```+|~~~+)\s*(\w*)", line)
        if m and fence is None:
            fence = (m.group(1), m.group(2).lower())
            prose.append("")
        elif fence is not None and line.strip().startswith(fence[0]):
            fence = None
            prose.append("")
        elif fence is not None or line.startswith("    "):
            while line.rstrip().endswith("\\") and i + 1 < len(lines):  # shell continuation
                i += 1
                line = line.rstrip()[:-1] + " " + lines[i].strip()
            if fence is None or fence[1] not in ("python", "py"):
                found += _commands_in(line)
            prose.append("")
        else:
            prose.append(line)
        i += 1
    for span in re.findall(r"`([^`]+)`", "\n".join(prose)):
        found += _commands_in(span.replace("\n", " "))
    return found


def _commands_in(line: str) -> list[str]:
    out = []
    for segment in re.split(r"&&|;|\s#\s|^#\s", line):
        m = _PROGRAM.search(segment)
        if m and not re.search(r"\b(import|from)\s+$", segment[: m.start()]):
            out.append(segment[m.start():].strip())
    return out


@dataclasses.dataclass
class Problem:
    kind: str  # "flag", "value", "default", "name"
    where: str
    command: str
    what: str

    def __str__(self) -> str:
        return f"{self.where}: `{self.command}`: {self.what}"


@dataclasses.dataclass
class _Walk:
    """Walks one command's tokens against the parser it reaches."""

    where: str
    command: str
    problems: list
    seen: set  # (parser name, flag) pairs met, for the README coverage check

    def report(self, kind: str, what: str) -> None:
        self.problems.append(Problem(kind, self.where, self.command, what))


def _tokens(command: str) -> list[tuple[str, int | None]]:
    """Tokens with the id of the ``[...]`` group each lies in (None outside any)."""
    out, group, depth, next_id = [], None, 0, 0
    for tok in re.findall(r"\[|\]|[^\s\[\]]+", command):
        if tok == "[":
            depth += 1
            if depth == 1:
                group, next_id = next_id, next_id + 1
        elif tok == "]":
            depth = max(0, depth - 1)
            group = None if depth == 0 else group
        else:
            out.append((tok, group))
    return out


def _values(opt: Opt, toks: list, i: int) -> int:
    """How many tokens after toks[i] are the option's values."""
    if opt.nargs == 0:
        return 0
    if isinstance(opt.nargs, int):
        want = opt.nargs
    elif opt.nargs in (None, "?"):
        want = 1
    else:  # "+", "*": up to the next flag or the end of the option's [...] group
        want = len(toks)
    n = 0
    while n < want and i + 1 + n < len(toks):
        tok, group = toks[i + 1 + n]
        if tok.startswith("-") and len(tok) > 1 and not re.fullmatch(r"-[\d.]+(e-?\d+)?", tok):
            break
        if opt.nargs in ("+", "*") and group != toks[i][1]:
            break
        n += 1
    return n


def _same(shown: str, default: Any) -> bool:
    expected = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)
    if shown == expected:
        return True
    try:
        return float(shown) == float(expected)
    except ValueError:
        return False


def _check_options(walk: _Walk, spec: Spec, name: str, toks: list, positional: Callable[[str], None]) -> None:
    """Flags, their values and usage-hint defaults of toks against one parser spec."""
    defense = next((toks[j + 1][0] for j in range(len(toks) - 1) if toks[j][0] == "--defense"), None)
    groups: dict = {}
    for tok, group in toks:
        if group is not None:
            groups.setdefault(group, []).append(tok)
    i = 0
    while i < len(toks):
        tok, group = toks[i]
        if not tok.startswith("--"):
            positional(tok)
            i += 1
            continue
        flag, _, inline = tok.rstrip(":;,.").partition("=")
        if flag == "--help":  # every parser has it
            i += 1
            continue
        if flag not in spec:
            walk.report("flag", f"{flag} is not an option of {name}")
            i += 1
            continue
        walk.seen.add((name, flag))
        opt = spec[flag]
        n = 0 if inline else _values(opt, toks, i)
        values = [inline] if inline else [t for t, _ in toks[i + 1: i + 1 + n]]
        ok = _check_values(walk, name, flag, opt, values, defense)
        if ok and group is not None and groups[group] == [tok, *values] and values:
            shown = " ".join(values)
            if opt.default not in (None, False, _UNKNOWN, argparse.SUPPRESS) and not _is_placeholder(shown):
                ok = opt.default in shown.split("|") if "|" in shown else _same(shown, opt.default)
                if not ok:
                    walk.report("default", f"[{flag} {shown}] but {name}'s default is {opt.default!r}")
        i += 1 + n


def _check_values(walk: _Walk, name: str, flag: str, opt: Opt, values: list, defense: str | None) -> bool:
    """Reports each value the parser or the registries refuse; True when there was none."""
    before = len(walk.problems)
    if opt.nargs in ("+", "*") and any("," in v for v in values):
        walk.report("value", f"{flag} takes space-separated values ({name} has nargs={opt.nargs!r}), "
                             f"not {' '.join(values)}")
        return False
    allowed = frozenset(map(str, opt.choices)) if opt.choices else _domains().get(flag)
    for v in values:
        if _is_placeholder(v):
            continue
        if flag == "--defense-arg" and defense and not _is_placeholder(defense):
            from gitjax.defenses import DEFENSES

            key = v.partition("=")[0]
            if defense in DEFENSES and key not in inspect.signature(DEFENSES[defense]).parameters:
                walk.report("value", f"--defense-arg {v}: defence {defense!r} has no hyper-parameter {key!r}")
        if allowed is None:
            continue
        for part in re.split(r"[|,]", v):
            if part and not _is_placeholder(part) and part not in allowed:
                walk.report("value", f"{flag} {part}: not one of {name}'s {', '.join(sorted(allowed))}")
    return len(walk.problems) == before


def _check_study(walk: _Walk, name: str, toks: list) -> None:
    first = []

    def positional(tok: str) -> None:  # the first is the experiment; later words are prose
        first.append(tok)
        if len(first) == 1 and not _is_placeholder(tok) and tok not in _experiments():
            walk.report("name", f"no experiment {tok!r} (gitjax experiment list)")

    _check_options(walk, _captured_spec("gitjax.study"), name, toks, positional)


def _check_script(walk: _Walk, path: Path, toks: list) -> None:
    if not path.exists():
        walk.report("name", f"{path.relative_to(ROOT)} does not exist")
        return
    _check_options(walk, _script_spec(path), str(path.relative_to(ROOT)), toks, lambda tok: None)


def check_command(command: str, where: str, problems: list, seen: set) -> None:
    """Appends a Problem for every flag, name or default of ``command`` that its parser contradicts."""
    walk = _Walk(where, command, problems, seen)
    m = _PROGRAM.match(command)
    program, toks = m.group(1), _tokens(command[m.end():])
    if program.startswith("python") and "benchmarks/" in program:
        stem = Path(program.split()[-1]).stem
        if not _is_placeholder(stem):
            _check_script(walk, ROOT / "benchmarks" / f"{stem}.py", toks)
        return
    if program.startswith("python"):
        module = program.split()[-1]
        if module in ("experiments.run", "gitjax.study"):
            _check_study(walk, module, toks)
        elif module == "gitjax.train":
            _check_options(walk, _captured_spec("gitjax.train"), module, toks, lambda tok: None)
        elif module == "gitjax.cli":
            check_command("gitjax " + command[m.end():], where, problems, seen)
        elif module.startswith("experiments."):
            _check_script(walk, ROOT / "experiments" / f"{module.split('.', 1)[1]}.py", toks)
        return

    top, subs = _gitjax()
    for i, (tok, _) in enumerate(toks):
        if tok.startswith("--"):
            flag = tok.rstrip(":;,.")
            if flag == "--help":
                continue
            if flag not in top:
                walk.report("flag", f"{flag} is not an option of gitjax (before the subcommand)")
            else:
                seen.add(("gitjax", flag))
            continue
        if tok not in subs:
            if not _is_placeholder(tok):
                walk.report("name", f"gitjax has no subcommand {tok!r} ({', '.join(subs)})")
            _check_options(walk, top, "gitjax", toks[i + 1:], lambda t: None)
            return
        sub, rest = tok, toks[i + 1:]
        break
    else:
        return
    if sub == "experiment":
        _check_study(walk, "gitjax experiment", rest)
        return
    if sub == "bench":
        names = [t for t, _ in rest if re.fullmatch(r"[a-z_]+", t)]
        for n in names:
            if n not in _benchmarks():
                walk.report("name", f"no benchmark {n!r} in benchmarks/")
            seen.add(("bench", n))
        if names and names[0] in _benchmarks():
            _check_script(walk, ROOT / "benchmarks" / f"{names[0]}.py", rest[1:])
        return
    _check_options(walk, subs[sub], f"gitjax {sub}", rest, lambda t: None)


def check_doc(text: str, where: str) -> tuple[list[Problem], set]:
    problems, seen = [], set()
    for command in commands(text):
        check_command(command, where, problems, seen)
    return problems, seen


@functools.lru_cache(maxsize=None)
def _all() -> tuple[tuple[Problem, ...], dict[str, frozenset]]:
    problems, seen = [], {}
    for path in DOCS:
        p, s = check_doc(path.read_text(), str(path.relative_to(ROOT)))
        problems += p
        seen[path.name] = frozenset(s)
    return tuple(problems), seen


def _listing(problems) -> str:
    return "\n".join(map(str, problems))


# ----------------------------------------------------------------------------- the tests


def test_the_checker_finds_commands_and_catches_each_kind_of_disagreement():
    doc = """
```bash
gitjax train-prior --preset nope --workdir runs/x --no-such-flag
gitjax attack --method git --checkpoint runs/x \\
              [--batch-size 4] [--defense gaussian --defense-arg sdt=0.1]
python benchmarks/generator_step.py [--victims lenet,resnet8]
```
Inline: `gitjax demo [--prior-steps 400] [--generator coarse|exact|lti]` and `gitjax bench nope`,
`python -m experiments.run nope --scale huge`; not commands: `import gitjax`, `gitjax: error: x`.
"""
    problems, seen = check_doc(doc, "doc")

    def has(kind: str, *parts: str) -> bool:
        return any(p.kind == kind and all(x in p.what for x in parts) for p in problems)

    assert has("flag", "--no-such-flag", "gitjax train-prior"), _listing(problems)
    assert has("value", "--preset nope"), _listing(problems)
    assert has("default", "[--batch-size 4]", "default is 1"), _listing(problems)
    assert has("value", "--defense-arg sdt=0.1", "'gaussian'"), _listing(problems)
    assert has("value", "--victims", "space-separated"), _listing(problems)
    assert has("name", "benchmark 'nope'"), _listing(problems)
    assert has("name", "experiment 'nope'"), _listing(problems)
    assert has("value", "--scale huge"), _listing(problems)
    assert len(problems) == 8, _listing(problems)
    assert ("gitjax demo", "--prior-steps") in seen and ("gitjax attack", "--checkpoint") in seen


def test_every_documented_flag_exists_in_its_parser():
    problems = [p for p in _all()[0] if p.kind == "flag"]
    assert not problems, _listing(problems)


def test_every_documented_name_is_registered():
    problems = [p for p in _all()[0] if p.kind in ("value", "name")]
    assert not problems, _listing(problems)


def test_usage_hints_show_the_parser_defaults():
    problems = [p for p in _all()[0] if p.kind == "default"]
    assert not problems, _listing(problems)


def test_the_docs_read_enough_commands():
    # Guards the checker itself: if the doc reader broke, the tests above would pass on nothing.
    seen = _all()[1]
    assert len(seen["README.md"]) > 40 and len(seen["benchmarks.md"]) > 10, seen


def test_every_cli_flag_is_shown_in_the_readme():
    top, subs = _gitjax()
    seen = _all()[1]["README.md"]
    missing = [f"gitjax {f}" for f in top if ("gitjax", f) not in seen]
    missing += [f"gitjax {sub} {f}" for sub, spec in subs.items() if sub not in ("experiment", "bench")
                for f in spec if (f"gitjax {sub}", f) not in seen]
    missing += [f"gitjax bench {b}" for b in sorted(_benchmarks()) if ("bench", b) not in seen]
    assert not missing, "README.md does not show: " + ", ".join(missing)


_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def test_docs_link_only_to_files_inside_the_repository():
    bad = []
    for path in DOCS:
        text = path.read_text()
        for target in _LINK.findall(text):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            resolved = (path.parent / target.split("#")[0]).resolve()
            if not resolved.is_relative_to(ROOT) or not resolved.exists():
                bad.append(f"{path.relative_to(ROOT)}: ({target})")
        for m in re.finditer(r"(?<![\w.])\.\./|\b(PAPER|STYLE|COMMON|stops)\.md\b|\bissue\d+\.md\b", text):
            bad.append(f"{path.relative_to(ROOT)}: names {m.group(0)!r}, a file outside the repository")
    assert not bad, "\n".join(bad)


_ABSOLUTE_TEMP = re.compile(r"(?<![\w.~])/(tmp|work|home|Users|root|var/folders|private/var)/")


def test_no_absolute_temporary_paths_in_docs_or_the_package():
    files = DOCS + sorted((ROOT / "gitjax").rglob("*.py"))
    bad = [f"{f.relative_to(ROOT)}:{n}: {line.strip()}" for f in files
           for n, line in enumerate(f.read_text().splitlines(), 1) if _ABSOLUTE_TEMP.search(line)]
    assert not bad, "use a relative example path (runs/...):\n" + "\n".join(bad)


# Remarks that only make sense to whoever ran the measurement; the docs state the machine and date.
_CIRCUMSTANCE = re.compile(r"\b(loaded machine|oversubscribed machine|this (task|session|round)|today|"
                           r"yesterday|last session|stop \d+|the brief)\b", re.IGNORECASE)


def test_docs_state_conditions_not_circumstances():
    bad = [f"{p.relative_to(ROOT)}:{n}: {m.group(0)!r}" for p in DOCS
           for n, line in enumerate(p.read_text().splitlines(), 1) for m in _CIRCUMSTANCE.finditer(line)]
    assert not bad, "state the machine, date and load instead:\n" + "\n".join(bad)


# ----------------------------------------------------------------------------- the CLI's own help

# Flags of other tools the docs and help mention: tfds build/convert_format, XLA, SLURM's srun.
_EXTERNAL_FLAGS = {"--data_dir", "--file_format", "--root_data_dir", "--out_file_format", "--ntasks-per-node"}
_FLAG = re.compile(r"(?<![\w-])--[a-z][\w-]*")


def _external(flag: str) -> bool:
    return flag in _EXTERNAL_FLAGS or flag.startswith("--xla_")


def test_every_flag_named_in_the_docs_or_the_package_belongs_to_some_parser():
    """Prose, error messages and docstrings included: a flag nobody parses is a stale name."""
    known = set(_gitjax()[0]).union(*_gitjax()[1].values(), _captured_spec("gitjax.study"),
                                    _captured_spec("gitjax.train"), {"--help"})
    for folder in ("experiments", "benchmarks"):
        for path in (ROOT / folder).glob("*.py"):
            known |= set(_script_spec(path))
    files = DOCS + sorted((ROOT / "gitjax").rglob("*.py"))
    bad = [f"{p.relative_to(ROOT)}:{n}: {flag}" for p in files for n, line in enumerate(p.read_text().splitlines(), 1)
           for flag in _FLAG.findall(line) if flag not in known and not _external(flag)]
    assert not bad, "flags no parser has:\n" + "\n".join(bad)


def test_cli_help_names_only_real_flags():
    bad = []
    for name, parser in _subparsers().items():
        spec = _captured_spec("gitjax.study") if name == "experiment" else _spec_of(parser)
        if name == "":
            texts = [a.help or "" for a in parser._actions]  # the description lists commands, not flags
        else:
            texts = [parser.description or "", *(a.help or "" for a in parser._actions)]
        own = set(_spec_of(parser)) | set(spec) | {"--help"}
        bad += [f"gitjax {name}: {f}" for t in texts for f in _FLAG.findall(t) if f not in own and not _external(f)]
    assert not bad, "\n".join(bad)


def test_cli_help_states_each_default():
    bad = []
    for name, parser in _subparsers().items():
        for a in parser._actions:
            if a.default in (None, False, argparse.SUPPRESS) or not a.option_strings or a.required:
                continue
            text = a.help or ""
            m = re.search(r"default:? ([^;,):]+)", text)
            if m:
                ok = _same(m.group(1).strip(), a.default)
            else:
                ok = f"{a.default} (default)" in text
            if not ok:
                bad.append(f"gitjax {name} {a.option_strings[0]}: help {text!r} vs default {a.default!r}")
    assert not bad, "\n".join(bad)


def test_train_prior_help_states_trainconfig_defaults():
    from gitjax.configs import TrainConfig

    c = TrainConfig()
    expected = {"--victim": c.victim, "--data": c.dataset, "--generator": c.generator.kind,
                "--batch-size": c.victim_batch, "--steps": c.steps, "--global-batch": c.global_batch,
                "--lr": c.lr, "--seed": c.seed, "--param-perturb": c.param_discrepancy[1]}
    helps = {a.option_strings[0]: a.help or "" for a in _subparsers()["train-prior"]._actions if a.option_strings}
    bad = []
    for flag, value in expected.items():
        m = re.search(r"else ([^;,)]+)", helps[flag])
        if not (m and _same(m.group(1).strip(), value)):
            bad.append(f"{flag}: help {helps[flag]!r}, TrainConfig default {value!r}")
    assert not bad, "\n".join(bad)


def test_cli_help_lists_every_registered_attack_defence_and_benchmark():
    from gitjax.attacks import ATTACKS
    from gitjax.defenses import DEFENSES

    subs = _subparsers()

    def listed(sub: str, dest: str) -> set:
        text = next(a.help for a in subs[sub]._actions if a.dest == dest)
        return set(re.findall(r"[\w+-]+", text))

    assert set(ATTACKS) <= listed("attack", "method"), sorted(set(ATTACKS) - listed("attack", "method"))
    # dpsgd needs per-example gradients; gitjax attack leaks batch gradients and refuses it.
    assert set(DEFENSES) - {"dpsgd"} <= listed("attack", "defense")
    assert _benchmarks() <= listed("bench", "name"), sorted(_benchmarks() - listed("bench", "name"))


# ----------------------------------------------------------------------------- Python names in the docs


def _resolves(dotted: str) -> bool:
    import importlib

    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ModuleNotFoundError:
            continue
        for attr in parts[i:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


def test_python_names_in_the_docs_resolve():
    """``gitjax.x.y`` anywhere, and the gitjax imports of every python code block, name real objects."""
    bad = []
    for path in DOCS:
        text = path.read_text()
        names = set(re.findall(r"(?<![\w/])gitjax(?:\.[A-Za-z_]\w*)+", text))
        for block in re.findall(r"```python\n(.*?)```", text, re.DOTALL):
            try:
                tree = ast.parse(block)
            except SyntaxError as e:
                bad.append(f"{path.relative_to(ROOT)}: a python block does not parse ({e.msg}, line {e.lineno})")
                continue
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "gitjax":
                    names |= {f"{node.module}.{a.name}" for a in node.names}
                elif isinstance(node, ast.Import):
                    names |= {a.name for a in node.names if a.name.split(".")[0] == "gitjax"}
        bad += [f"{path.relative_to(ROOT)}: {n}" for n in sorted(names) if not _resolves(n)]
    assert not bad, "names that do not resolve:\n" + "\n".join(bad)


def test_readme_layout_names_every_module():
    text = (ROOT / "README.md").read_text()
    layout = text[text.index("## Layout"):]
    layout = layout[: layout.index("\n## ", 1)]
    modules = [p.name for p in (ROOT / "gitjax").glob("*.py") if not p.name.startswith("__")]
    modules += [p.name + "/" for p in (ROOT / "gitjax").iterdir() if (p / "__init__.py").exists()]
    missing = [m for m in sorted(modules) if not re.search(rf"(?<![\w/]){re.escape(m)}", layout)]
    assert not missing, f"README.md's Layout does not name {missing}"


def test_commands_in_docstrings_use_real_flags_and_names():
    problems = []
    for folder in ("gitjax", "experiments", "benchmarks"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    doc = ast.get_docstring(node)
                    if doc:
                        problems += check_doc(doc, f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', 1)}")[0]
    problems = [p for p in problems if p.kind != "default"]
    assert not problems, _listing(problems)
