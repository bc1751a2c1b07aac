"""Command-line options derived from the config dataclasses (vqkit.cli.args), the parser's
layout and main's error handling; no training here."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field

import pytest

import vqkit
from vqkit.cli import stage1 as cli_stage1
from vqkit.cli.args import add_config_args, config_from_args, docstring_args, field_help
from vqkit.cli.main import build_parser, main
from vqkit.errors import UsageError
from vqkit.precision import PlacementConfig
from vqkit.prior import PriorConfig
from vqkit.train.prior import PriorTrainConfig
from vqkit.train.stage1 import TrainConfig


def _field_names(cls, less=()) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)} - set(less)


def test_the_config_classes_document_every_field():
    for cls in (TrainConfig, PriorTrainConfig, PriorConfig, PlacementConfig):
        assert set(field_help(cls)) == _field_names(cls)


def test_docstring_args_parsing():
    doc = """Summary.

    Args:
        alpha: first line
            and its continuation.
        beta (int): one line.

    Returns:
        gamma: not an argument.
    """
    assert docstring_args(doc) == {"alpha": "first line and its continuation.", "beta": "one line."}
    assert docstring_args("No sections.") == {} and docstring_args(None) == {}


def test_a_field_missing_from_args_is_an_error():
    @dataclass
    class Base:
        """The base.

        Args:
            a: documented in the base.
        """
        a: int = 1

    @dataclass
    class Child(Base):
        """The child, whose c is undocumented.

        Args:
            b: documented.
        """
        b: int = 2
        c: int = 3

    with pytest.raises(TypeError, match=r"Child: field\(s\) c have no entry"):
        add_config_args(argparse.ArgumentParser(), Child)

    @dataclass
    class Stale:
        """An entry that names no field.

        Args:
            a: documented.
            gone: a field that was removed.
        """
        a: int = 1

    with pytest.raises(TypeError, match="Stale.gone name no field"):
        add_config_args(argparse.ArgumentParser(), Stale)


# --------------------------------------------------------------------------------------------
# add_config_args on its own


@dataclass
class Example:
    """For the tests.

    Args:
        path: where (positional).
        count: how many.
        rate: how fast; 5% is fine.
        name: what.
        limit: an upper bound, or none.
        fast: go fast.
        quiet: say less.
        tags: labels.
        shape: not a command-line type.
    """

    path: str = "here"
    count: int = 3
    rate: float = 0.5
    name: str = "x"
    limit: int | None = None
    fast: bool = True
    quiet: bool = False
    tags: list[str] = field(default_factory=lambda: ["a"])
    shape: dict = field(default_factory=dict)


def _example_parser(**kw) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    add_config_args(parser, Example, exclude=["shape"], positional=["path"], flags={"name": ["-n", "--name"]},
                    choices={"name": ["x", "y"]}, **kw)
    return parser


def test_add_config_args_types():
    parser = _example_parser()
    args = parser.parse_args([])
    assert config_from_args(Example, args) == Example()
    args = parser.parse_args(["there", "--count", "4", "--rate", "2", "-n", "y", "--limit", "7", "--no-fast",
                              "--quiet", "--tags", "b", "--tags", "c"])
    assert config_from_args(Example, args) == Example(path="there", count=4, rate=2.0, name="y", limit=7,
                                                     fast=False, quiet=True, tags=["a", "b", "c"])
    assert config_from_args(Example, args, count=9).count == 9
    help = parser.format_help()
    assert "--fast, --no-fast" in help and "--no-quiet" not in help and "5% is fine" in help
    with pytest.raises(SystemExit):
        parser.parse_args(["--name", "z"])


def test_add_config_args_refuses_what_it_cannot_do():
    with pytest.raises(TypeError, match="shape"):
        add_config_args(argparse.ArgumentParser(), Example)
    with pytest.raises(TypeError, match="no field"):
        add_config_args(argparse.ArgumentParser(), Example, exclude=["shape", "typo"])
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, default=1)  # a hand-written option of the same dest
    with pytest.raises(TypeError, match="already has an option for 'count'"):
        add_config_args(parser, Example, exclude=["shape"])
    with pytest.raises(TypeError, match="not given Example's options"):
        config_from_args(Example, argparse.Namespace())


# --------------------------------------------------------------------------------------------
# The parser's layout and main


def test_every_command_is_there():
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert set(sub.choices) >= {"train", "eval", "reconstruct", "levels", "encode", "decode", "extract",
                                "train-prior", "sample", "compress", "decompress", "rd", "inspect", "report",
                                "demo"}
    for name, parser in sub.choices.items():
        assert callable(parser.get_default("func")), name


def test_version(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["--version"])
    assert exit.value.code == 0
    assert capsys.readouterr().out == f"vqkit {vqkit.__version__}\n"


def test_console_script_and_package_entry_point():
    import vqkit.cli
    assert vqkit.cli.main is main


@pytest.mark.parametrize("error", [UsageError("the run is missing"), FileNotFoundError(2, "No such file", "x")])
def test_a_vqkit_error_is_one_line_and_status_2(monkeypatch, capsys, error):
    def fails(args):
        raise error

    monkeypatch.setattr(cli_stage1, "cmd_eval", fails)
    assert main(["eval", "somewhere"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("vqkit: error: ") and "Traceback" not in err
    assert str(error) in err


def test_a_bug_keeps_its_traceback(monkeypatch):
    def buggy(args):
        raise KeyError("oops")

    monkeypatch.setattr(cli_stage1, "cmd_eval", buggy)
    with pytest.raises(KeyError, match="oops"):
        main(["eval", "somewhere"])
