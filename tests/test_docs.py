"""The generated docs (tools/docs.py): committed copies are current, man pages are clean
roff, and every option of the registry, every option and subcommand of gproxyctl's parser
and every exit status is documented where it belongs."""
from __future__ import annotations

import argparse
import importlib.util
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from gproxyd import ctl
from gproxyd.config import build_parser, load_config
from gproxyd.exitcodes import EXIT_CODES
from gproxyd.settings import GLOBAL_OPTIONS, ROUTE_OPTIONS

ROOT = Path(__file__).resolve().parent.parent


def _load_docs():
    """tools/docs.py, a build tool outside the package, imported by path."""
    spec = importlib.util.spec_from_file_location("docs", ROOT / "tools" / "docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


docs = _load_docs()
MAN_PAGES = ["man/gproxyd.8", "man/gproxyd.conf.5", "man/gproxyctl.1"]
ALL_OPTIONS = GLOBAL_OPTIONS + ROUTE_OPTIONS


def _committed(relative: str) -> str:
    return (ROOT / relative).read_text(encoding="utf-8")


def _plain(roff_source: str) -> str:
    """The words of a man page source, escapes undone, lines joined by spaces."""
    text = re.sub(r"\\f[BIRP]|\\%|\\&", "", roff_source)
    text = text.replace("\\-", "-").replace("\\(aq", "'").replace("\\(ga", "`")
    text = text.replace("\\e", "\\")
    lines = [re.sub(r"^\.(B|I|BR|IR|RB|RI) ", "", line) for line in text.splitlines()
             if not line.startswith(".\\\"")]
    return " ".join(lines)


def _section(roff_source: str, title: str) -> str:
    """The source of one .SH section of a man page."""
    match = re.search(rf'^\.SH "?{re.escape(title)}"?\n(.*?)(?=^\.SH |\Z)', roff_source,
                      re.M | re.S)
    assert match, f"no section {title!r}"
    return match.group(1)


# --- the committed copies are what the registry renders -------------------------------

@pytest.mark.parametrize("relative", sorted(docs.OUTPUTS))
def test_committed_copy_is_current(relative):
    rendered = docs.OUTPUTS[relative]()
    assert (ROOT / relative).exists(), f"{relative} is missing: run `{docs.REGENERATE}`"
    assert _committed(relative) == rendered, (
        f"{relative} differs from what tools/docs.py renders from the option registry: "
        f"run `{docs.REGENERATE}` and commit the result")


def test_main_writes_every_output_and_check_finds_it_current(tmp_path, capsys):
    assert docs.main(["--root", str(tmp_path)]) == 0
    for relative, render in docs.OUTPUTS.items():
        assert (tmp_path / relative).read_text(encoding="utf-8") == render()
    assert docs.main(["--root", str(tmp_path), "--check"]) == 0
    (tmp_path / "man/gproxyd.8").write_text("stale\n", encoding="utf-8")
    capsys.readouterr()
    assert docs.main(["--root", str(tmp_path), "--check"]) == 1
    assert "man/gproxyd.8" in capsys.readouterr().err


# --- the man pages are clean roff --------------------------------------------------------

@pytest.mark.parametrize("device", [[], ["-Tutf8"]], ids=["default-device", "utf8"])
@pytest.mark.parametrize("relative", MAN_PAGES)
def test_man_page_renders_without_warnings(relative, device):
    groff = shutil.which("groff")
    assert groff, "groff is not installed (apt-get install groff); the man pages go unchecked"
    result = subprocess.run([groff, "-man", "-ww", "-z", *device, str(ROOT / relative)],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0 and result.stderr == "", result.stderr


@pytest.mark.parametrize("relative", MAN_PAGES)
def test_man_page_has_no_unescaped_hyphen_or_request_like_text(relative):
    for number, line in enumerate(_committed(relative).splitlines(), 1):
        if line.startswith(".\\\""):
            continue
        # Every '-' is written \- (a hyphen would not survive copy and paste)...
        assert not re.search(r"(?<!\\)-", line), f"{relative}:{number}: bare '-': {line}"
        # ...and a text line never starts with a quote.
        assert not line.startswith("'"), f"{relative}:{number}: {line}"


def test_man8_sections():
    source = _committed("man/gproxyd.8")
    for title in ["NAME", "SYNOPSIS", "DESCRIPTION", "OPTIONS", "SIGNALS", "ENVIRONMENT",
                  "FILES", "EXIT STATUS", "EXAMPLES", "SEE ALSO"]:
        _section(source, title)
    synopsis = _plain(_section(source, "SYNOPSIS"))
    assert "gproxyd [ -c FILE ] [ --check-config ] [ options ]" in synopsis
    assert "gproxyd demo" in synopsis
    signals = _plain(_section(source, "SIGNALS"))
    for name in ["SIGHUP", "SIGTERM", "SIGINT", "SIGUSR1"]:
        assert name in signals
    exit_status = _plain(_section(source, "EXIT STATUS"))
    for code in ["0", "1", "64", "78"]:
        assert f"\\fB\\%{code}\\fR" in _section(source, "EXIT STATUS"), code
    assert "EX_CONFIG" in exit_status and "EX_USAGE" in exit_status
    assert "/etc/gproxyd/gproxyd.conf" in _plain(_section(source, "FILES"))
    assert ".BR gproxyd.conf (5)," in _section(source, "SEE ALSO")


def test_man5_sections():
    source = _committed("man/gproxyd.conf.5")
    for title in ["NAME", "SYNOPSIS", "DESCRIPTION", "SYNTAX", "VALUES", "GLOBAL OPTIONS",
                  "ROUTE OPTIONS", "DIAGNOSTICS", "EXAMPLE", "FILES", "SEE ALSO"]:
        _section(source, title)
    syntax = _plain(_section(source, "SYNTAX"))
    for word in ["[gproxyd]", "[route NAME]", ";", "#"]:
        assert word in syntax
    values = _plain(_section(source, "VALUES"))
    for form in ["host:port", "[ipv6]:port", "unix:/path", "ms, s, m or h", "KiB, MiB or GiB"]:
        assert form in values


# --- gproxyctl(1) is its parser; EXIT STATUS is exitcodes.EXIT_CODES --------------------

def _parser_entries(parser: argparse.ArgumentParser) -> list[tuple[str, str, str]]:
    """(section, how the page shows it, help) for every option and subcommand of PARSER
    and of its subcommands, hidden ones left out: read from argparse itself, not through
    tools/docs.py, so that the check does not share the renderer's mistakes."""
    entries = []
    for action in parser._actions:
        if action.help == argparse.SUPPRESS:
            continue
        if isinstance(action, argparse._SubParsersAction):
            for choice in action._choices_actions:
                entries.append(("COMMANDS", choice.dest, choice.help))
                entries += _parser_entries(action.choices[choice.dest])
            continue
        value = "" if action.nargs == 0 else f" {action.metavar or action.dest.upper()}"
        help_text = action.help % {**vars(action), "prog": parser.prog}
        entries += [("OPTIONS", flag + value, help_text) for flag in action.option_strings]
    return entries


def _assert_documents(page: str, parser: argparse.ArgumentParser) -> None:
    for section, shown, help_text in _parser_entries(parser):
        words = " ".join(_plain(_section(page, section)).split())
        assert shown in words, f"{shown!r} is not under {section}"
        assert " ".join(help_text.split()) in words, f"the help of {shown!r} is not under {section}"


def test_gproxyctl_page_documents_every_option_and_subcommand_of_its_parser():
    page = _committed("man/gproxyctl.1")
    _assert_documents(page, ctl.build_parser())
    synopsis = _plain(_section(page, "SYNOPSIS"))
    assert ("gproxyctl stats [ -c FILE ] [ --admin ADDRESS ] [ --admin-token FILE ] "
            "[ --json ] [ --watch ] [ --interval SECONDS ] [ --count N ]") in synopsis
    assert ("gproxyctl diff [ -c FILE ] [ --admin ADDRESS ] [ --admin-token FILE ] "
            "[ --route NAME ] "
            "[ --shadow ADDRESS ] [ --limit N ] [ --json ]") in synopsis
    assert "Default: 1.0" in _plain(_section(page, "OPTIONS"))


def test_an_option_or_subcommand_added_to_gproxyctl_shows_up_in_its_page():
    parser = ctl.build_parser()
    commands = next(action for action in parser._actions
                    if isinstance(action, argparse._SubParsersAction))
    commands.choices["stats"].add_argument("--since", metavar="WHEN",
                                           help="only requests after WHEN")
    commands.choices["stats"].add_argument("--internal", help=argparse.SUPPRESS)
    routes = commands.add_parser("routes", help="list the routes")
    routes.add_argument("--verbose", action="store_true", help="one line per backend too")
    page = docs.render_man1_gproxyctl(parser)
    _assert_documents(page, parser)
    synopsis = _plain(_section(page, "SYNOPSIS"))
    assert "[ --count N ] [ --since WHEN ]" in synopsis
    assert "gproxyctl routes [ --verbose ]" in synopsis
    assert "--internal" not in _plain(page)
    with pytest.raises(AssertionError, match="--since WHEN"):
        _assert_documents(_committed("man/gproxyctl.1"), parser)


@pytest.mark.parametrize("relative, codes", [("man/gproxyd.8", [0, 1, 64, 78]),
                                             ("man/gproxyctl.1", [0, 1, 64, 69, 78])])
def test_exit_status_is_rendered_from_exitcodes(relative, codes):
    section = _section(_committed(relative), "EXIT STATUS")
    assert [int(code) for code in re.findall(r"^\\fB\\%(\d+)\\fR", section, re.M)] == codes
    words = " ".join(_plain(section).split())
    for code, meaning in EXIT_CODES:
        if code in codes:
            assert " ".join(meaning.split()) in words, code


def test_every_exit_status_is_in_a_man_page():
    documented = set(docs.GPROXYD_EXITS) | set(docs.GPROXYCTL_EXITS)
    assert {code for code, _ in EXIT_CODES} <= documented


# --- every option is documented where it belongs -----------------------------------------

def test_every_global_option_is_in_help():
    # Route keys live only in the file, so they have no flag.
    help_text = build_parser().format_help()
    for option in GLOBAL_OPTIONS:
        assert docs.command_line(option) in help_text, option.name
        assert option.env in help_text, option.name
        assert " ".join(option.help.split()[:4]) in " ".join(help_text.split()), option.name


def test_every_global_option_is_in_man8():
    options = _plain(_section(_committed("man/gproxyd.8"), "OPTIONS"))
    for flag in ["-c FILE", "--config FILE", "--check-config", "--version", "--help"]:
        assert flag in options, flag
    for option in GLOBAL_OPTIONS:
        assert option.flag in options and option.metavar in options, option.name
        assert option.help in options, option.name
        assert f"Default: {docs.describe_default(option)}" in options, option.name
        assert f"Environment: {option.env}" in options, option.name


def test_every_option_is_in_man5():
    source = _committed("man/gproxyd.conf.5")
    for title, options in [("GLOBAL OPTIONS", GLOBAL_OPTIONS), ("ROUTE OPTIONS", ROUTE_OPTIONS)]:
        section = _plain(_section(source, title))
        for option in options:
            assert f"{option.name} = {option.metavar}" in section, option.name
            assert option.help in section, option.name
            assert f"Default: {docs.describe_default(option)}" in section, option.name
            assert f"Example: {option.name} = {docs.example_value(option)}" in section
            if options is GLOBAL_OPTIONS:
                assert option.flag in section and option.env in section, option.name


def test_every_kind_of_value_is_explained_in_man5():
    values = _plain(_section(_committed("man/gproxyd.conf.5"), "VALUES"))
    for option in ALL_OPTIONS:
        assert option.metavar in values, f"{option.name}: {option.metavar} not under VALUES"


def test_every_option_is_in_the_example_config():
    text = _committed("etc/gproxyd.conf")
    for option in ALL_OPTIONS:
        lines = re.findall(rf"^;?{re.escape(option.name)} =.*$", text, re.M)
        assert len(lines) == 1, f"{option.name}: {lines}"
        assert " ".join(option.help.split()) in " ".join(
            line.lstrip("; ") for line in text.splitlines()), option.name
    for option in GLOBAL_OPTIONS:
        assert option.env in text and option.flag in text, option.name


def test_every_example_value_is_valid():
    for option in ALL_OPTIONS:
        value = docs.example_value(option)
        assert value, f"{option.name}: no example (add its metavar to SAMPLE_BY_METAVAR)"
        option.parse(value)


# --- the examples load -------------------------------------------------------------------

def test_example_config_loads():
    config = load_config(str(ROOT / "etc/gproxyd.conf"), [], {})
    (route,) = config.routes
    assert (route.name, str(route.listen), str(route.production)) == \
        ("web", "127.0.0.1:8080", "127.0.0.1:8081")
    assert route.shadow == ()


def test_example_config_loads_with_every_key_uncommented(tmp_path):
    text = re.sub(r"^;(?=[a-z-]+ =)", "", _committed("etc/gproxyd.conf"), flags=re.M)
    path = tmp_path / "gproxyd.conf"
    path.write_text(text, encoding="utf-8")
    config = load_config(str(path), [], {})
    assert len(config.routes[0].shadow) == 2
    for option in GLOBAL_OPTIONS:
        assert getattr(config.settings, option.attr) == option.parse(option.default)


def test_man5_example_loads(tmp_path):
    # Its unix socket is in /run/gproxyd, which systemd's RuntimeDirectory= makes while
    # the service runs (--check-config refuses a socket directory that does not exist).
    path = tmp_path / "gproxyd.conf"
    assert "unix:/run/gproxyd/" in docs.MAN_EXAMPLE
    path.write_text(docs.MAN_EXAMPLE.replace("unix:/run/gproxyd/", f"unix:{tmp_path}/"),
                    encoding="utf-8")
    config = load_config(str(path), [], {})
    assert [route.name for route in config.routes] == ["web", "cache"]
    shown = _section(_committed("man/gproxyd.conf.5"), "EXAMPLE")
    assert [_plain(line) for line in shown.splitlines() if not line.startswith(".")] == \
        docs.MAN_EXAMPLE.splitlines()


# --- and nothing documented that is not there -------------------------------------------

def test_every_key_man5_documents_is_in_the_registry():
    for title, options in [("GLOBAL OPTIONS", GLOBAL_OPTIONS), ("ROUTE OPTIONS", ROUTE_OPTIONS)]:
        section = _plain(_section(_committed("man/gproxyd.conf.5"), title))
        documented = set(re.findall(r"(?<![\w-])([a-z][a-z-]*) = ", section))
        assert documented - {option.name for option in options} == set(), title


def test_every_flag_man8_documents_is_a_flag_of_the_parser():
    options = _plain(_section(_committed("man/gproxyd.8"), "OPTIONS"))
    parser = build_parser()
    flags = {flag for action in parser._actions for flag in action.option_strings}
    documented = set(re.findall(r"(?<![\w-])(--[a-z][a-z-]*)", options))
    assert documented - flags == set()


def test_every_flag_man1_documents_is_a_flag_of_gproxyctl():
    page = _plain(_committed("man/gproxyctl.1"))
    parser = ctl.build_parser()
    flags = {flag for action in parser._actions for flag in action.option_strings}
    for command in parser._actions[-1].choices.values():
        flags |= {flag for action in command._actions for flag in action.option_strings}
    # It also names gproxyd's own flags (gproxyd --check-config).
    flags |= {flag for action in build_parser()._actions for flag in action.option_strings}
    documented = set(re.findall(r"(?<![\w-])(--[a-z][a-z-]*)", page))
    assert documented - flags == set()
