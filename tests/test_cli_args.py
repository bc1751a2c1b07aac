"""The command line's options derived from the config dataclasses (vqkit.cli.args), the parser's
layout and main's error handling; no training here."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field

import pytest

import vqkit
from vqkit.cli import prior as cli_prior
from vqkit.cli import stage1 as cli_stage1
from vqkit.cli.args import add_config_args, config_args, config_from_args, docstring_args, field_help
from vqkit.cli.main import build_parser, main
from vqkit.errors import UsageError
from vqkit.precision import PlacementConfig
from vqkit.prior import PriorConfig
from vqkit.training.prior import SIZED_BY_MAPS, PriorTrainConfig
from vqkit.training.stage1 import TrainConfig


def parse(argv: list[str]) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def _action(argv: list[str], dest: str) -> argparse.Action:
    """The action of option ``dest`` in the subcommand that ``argv`` names."""
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return next(a for a in sub.choices[argv[0]]._actions if a.dest == dest)


def _field_names(cls, less=()) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)} - set(less)


# --------------------------------------------------------------------------------------------
# The defaults are the dataclasses' own


def test_train_defaults_are_train_config_defaults():
    args = parse(["train", "--data", "x", "-o", "y"])
    assert config_from_args(TrainConfig, args) == TrainConfig(data="x")
    # Every field, the placement ones included, comes from the dataclass: none hand-written.
    assert set(config_args(TrainConfig, args)) == _field_names(TrainConfig)
    assert {"device", "precision", "channels_last", "compile"} <= set(config_args(TrainConfig, args))


def test_train_prior_defaults_are_the_config_defaults():
    args = parse(["train-prior", "codes", "-o", "p"])
    assert config_from_args(PriorTrainConfig, args) == PriorTrainConfig(codes="codes")
    assert set(config_args(PriorTrainConfig, args)) == _field_names(PriorTrainConfig)
    sizes = config_args(PriorConfig, args)
    assert set(sizes) == _field_names(PriorConfig, cli_prior._FROM_DATA)
    # The sizes that follow the number of maps are left to prior_config_for; the rest are PriorConfig's.
    assert {name for name, value in sizes.items() if value is None} == set(SIZED_BY_MAPS)
    given = {name: value for name, value in sizes.items() if value is not None}
    assert PriorConfig(**given, **{name: getattr(PriorConfig(), name) for name in SIZED_BY_MAPS}) == PriorConfig()
    assert args.conditional is False


def test_train_every_option_parses_into_the_config():
    args = parse(["train", "--data", "x", "-o", "y", "--steps", "5", "--batch-size", "3", "--lr", "0.1",
                  "--seed", "2", "--time-budget", "9", "--checkpoint-every", "7", "--log-every", "4",
                  "--image-every", "6", "--image-size", "32", "--skip-bad", "--device", "cpu",
                  "--precision", "fp32", "--no-channels-last", "--compile"])
    assert config_from_args(TrainConfig, args) == TrainConfig(
        data="x", steps=5, batch_size=3, lr=0.1, seed=2, time_budget=9.0, checkpoint_every=7, log_every=4,
        image_every=6, image_size=32, skip_bad=True, device="cpu", precision="fp32", channels_last=False,
        compile=True)
    assert isinstance(config_from_args(TrainConfig, args).time_budget, float)
    assert parse(["train", "--data", "x", "-o", "y", "--channels-last"]).channels_last is True


def test_train_prior_every_option_parses_into_the_configs():
    args = parse(["train-prior", "codes", "-o", "p", "--cond", "a", "--cond", "b", "--val-codes", "v",
                  "--val-cond", "va", "--val-cond", "vb", "--val-fraction", "0.1", "--steps", "3",
                  "--batch-size", "4", "--lr", "0.01", "--seed", "1", "--time-budget", "10",
                  "--checkpoint-every", "2", "--log-every", "3", "--eval-every", "5", "--precision", "bf16",
                  "--channels-last", "--arch", "pixelcnn", "--channels", "8", "--layers", "2",
                  "--kernel-size", "5", "--dropout", "0.1", "--attention-heads", "2", "--attention-every", "3",
                  "--cond-layers", "1", "--conditional"])
    assert config_from_args(PriorTrainConfig, args) == PriorTrainConfig(
        codes="codes", val_codes="v", cond_codes=["a", "b"], val_cond_codes=["va", "vb"], val_fraction=0.1,
        steps=3, batch_size=4, lr=0.01, seed=1, time_budget=10.0, checkpoint_every=2, log_every=3,
        eval_every=5, precision="bf16", channels_last=True)
    assert config_args(PriorConfig, args) == dict(arch="pixelcnn", channels=8, layers=2, kernel_size=5,
                                                  dropout=0.1, attention_heads=2, attention_every=3,
                                                  cond_layers=1)
    assert args.conditional is True


def test_list_options_start_empty_each_parse():
    parser = build_parser()
    assert parser.parse_args(["train-prior", "c", "-o", "p", "--cond", "a"]).cond_codes == ["a"]
    assert parser.parse_args(["train-prior", "c", "-o", "p"]).cond_codes == []


@pytest.mark.parametrize("argv", [
    ["train", "-o", "y"],                                   # --data is required (no default)
    ["train", "--data", "x", "-o", "y", "--precision", "fp8"],
    ["train-prior", "c", "-o", "p", "--arch", "transformer"],
    ["train-prior", "-o", "p"],                             # CODES is required
    ["train", "--data", "x", "-o", "y", "--steps", "many"],
])
def test_bad_options_are_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as exit:
        parse(argv)
    assert exit.value.code == 2


# --------------------------------------------------------------------------------------------
# Help texts come from the Args: sections


def test_help_comes_from_the_args_entry():
    docs = field_help(TrainConfig)
    assert docs["batch_size"] == "images per step (per process, when data-parallel)."
    assert _action(["train"], "batch_size").help == "images per step (per process, when data-parallel) (default: 64)"
    # An inherited field finds its base's entry.
    assert _action(["train"], "compile").help == field_help(PlacementConfig)["compile"]
    # Continuation lines are joined.
    cond = _action(["train-prior"], "cond_codes")
    assert ("the code sets of the levels above CODES that the prior is conditioned on, from the same "
            "extraction, top-first") in cond.help
    assert cond.option_strings == ["--cond"] and cond.metavar == "COND"
    assert _action(["train-prior"], "val_cond_codes").option_strings == ["--val-cond"]
    # Other fields named in a help text are spelled as the command line spells them.
    assert field_help(PriorTrainConfig)["val_codes"] == "a held-out code set (default: the last val_fraction of codes)."
    assert _action(["train-prior"], "val_codes").help == ("a held-out code set (default: the last "
                                                          "--val-fraction of CODES).")
    assert "each --cond level" in _action(["train-prior"], "val_cond_codes").help
    assert field_help(PriorConfig)["channels"] == "channels of every layer."
    assert _action(["train-prior"], "kernel_size").help == "side of the causal convolutions (odd, >= 3) (default: 3)"
    assert _action(["train-prior"], "channels").help == ("channels of every layer (default: by the number of "
                                                         "training maps, printed when training starts)")


def test_the_config_classes_document_every_field():
    for cls in (TrainConfig, PriorTrainConfig, PriorConfig, PlacementConfig):
        assert set(field_help(cls)) == _field_names(cls)


def test_help_of_every_command_renders(capsys):
    for command in ("train", "train-prior", "demo", "eval"):
        with pytest.raises(SystemExit):
            parse([command, "--help"])
        assert "usage: vqkit " + command in capsys.readouterr().out


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


def test_unset_options_default_to_none_and_say_who_decides():
    parser = _example_parser(unset={"count": "by the data", "rate": "by the data"})
    assert config_args(Example, parser.parse_args([]))["count"] is None
    assert config_args(Example, parser.parse_args(["--count", "3"]))["count"] == 3
    assert "(default: by the data)" in " ".join(parser.format_help().split())
    with pytest.raises(TypeError, match="no field"):
        _example_parser(unset={"typo": "x"})


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
                                "demo", "collapse"}
    for name, parser in sub.choices.items():
        assert callable(parser.get_default("func")), name


def test_collapse_options_parse_into_its_settings():
    from vqkit.cli.inspect import _collapse_settings
    from vqkit.inspect.collapse import CollapseSettings

    args = parse(["collapse", "--data", "x", "--budget", "30", "--decoder", "pixelcnn", "-o", "out"])
    assert _collapse_settings(args) == CollapseSettings(data="x", budget=30.0, decoders=["pixelcnn"])
    assert _collapse_settings(parse(["collapse", "--data", "x", "-o", "out"])).decoders == ["conv", "pixelcnn"]


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
