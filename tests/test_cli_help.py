"""Every command's ``--help`` shows every option's default, and the config options are the declared ones."""

from __future__ import annotations

import dataclasses
import re

import pytest
import typer.main
from typer.testing import CliRunner

from medkd.cli import app
from medkd.config import DistillConfig, TeacherConfig
from medkd.options import option_specs

COMMANDS = sorted(typer.main.get_command(app).commands)


def _rows(command: str):
    """``{long flag: its help row}``, rendered wide enough that each option is one line."""
    r = CliRunner().invoke(app, [command, "--help"], env={"TERMINAL_WIDTH": "1000"})
    assert r.exit_code == 0, r.output
    click_cmd = typer.main.get_command(app).commands[command]
    rows = {}
    for p in click_cmd.params:
        if p.param_type_name != "option" or p.name == "help":
            continue
        flag = max(p.opts, key=len)
        line = next((ln for ln in r.output.splitlines() if re.match(rf"^\W*{re.escape(flag)}\s", ln)), None)
        assert line is not None, f"{command}: {flag} not in --help"
        rows[flag] = (p, line)
    return rows


@pytest.mark.parametrize("command", COMMANDS)
def test_help_shows_every_default(command):
    """A value option that is not required says its default; only plain on-switches (absent = off) need not."""
    for flag, (p, line) in _rows(command).items():
        if p.required or (p.is_flag and not p.secondary_opts and not p.default):
            continue
        assert "[default:" in line, f"medkd {command} {flag}: no default in --help: {line.strip()}"


@pytest.mark.parametrize("command, cls", [("distill", DistillConfig), ("train-teacher", TeacherConfig)])
def test_config_flags_show_the_declared_default(command, cls):
    """The help of a config option carries the dataclass default (one declaration, rendered)."""
    from medkd.cli.common import default_text

    rows = _rows(command)
    specs = option_specs(cls)
    for f in dataclasses.fields(cls):
        spec = specs[f.name]
        flag = (spec.flag or "--" + f.name.replace("_", "-")).split("/")[0]
        if flag not in rows:
            continue
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        shown = spec.default_text or default_text(default)
        assert f"[default: {shown}]" in rows[flag][1], (flag, rows[flag][1])


def test_registry_names_in_help():
    """Help lists the registries' contents (a new loss or model needs no help-text edit)."""
    from medkd.registry import LOSSES

    rows = _rows("distill")
    assert all(name in rows["--loss"][1] for name in LOSSES.names())
    assert "s1, s2" in rows["--student"][1]


def test_distillation_levers_in_help():
    """The levers' options are on the command line with their defaults (the lead's experiments set them there)."""
    rows = _rows("distill")
    for flag, default in (("--pmd-loss", "kl"), ("--pseudo-label", "on with PMD or a feature scale (the recipe chosen on val), off for the student alone"), ("--kd-warmup-epochs", "0"),
                          ("--ema-decay", "0")):
        assert f"[default: {default}]" in rows[flag][1], flag
    assert "kl, cwd" in rows["--pmd-loss"][1]
    assert "[default: 0]" in _rows("train-teacher")["--ema-decay"][1]
