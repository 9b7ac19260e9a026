"""The command-line entry points print a user's mistake (the ConfigError family, contrastive.errors) as one line
with exit code 2, and let every other exception through with its traceback: an internal ValueError is a bug to
see, not a message to trust."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from contrastive.cli import data as data_cli
from contrastive.cli import export as export_cli
from contrastive.errors import ConfigError, InputError, TrainingDiverged

CLI = Path(__file__).resolve().parents[1] / "contrastive" / "cli"


class _FailingInWorker(torch.utils.data.IterableDataset):
    def __iter__(self):
        raise InputError("data source 'web': 2 of the 4 shards were lost: a.tar, b.tar")
        yield


def test_an_error_from_a_data_loader_worker_keeps_its_one_line():
    """torch re-makes a worker's exception from its traceback text; the family keeps the original message."""
    with pytest.raises(InputError) as raised:
        next(iter(torch.utils.data.DataLoader(_FailingInWorker(), num_workers=1)))
    assert str(raised.value) == ("data source 'web': 2 of the 4 shards were lost: a.tar, b.tar "
                                 "(DataLoader worker process 0)")


def test_the_family_is_value_errors_under_config_error():
    assert issubclass(ConfigError, ValueError)
    assert issubclass(InputError, ConfigError) and issubclass(TrainingDiverged, ConfigError)


@pytest.mark.parametrize("raised", [InputError("shard x.tar does not exist"), TrainingDiverged("3 non-finite steps")])
def test_data_cli_prints_the_family_as_one_line(monkeypatch, capsys, raised):
    def fail(args):
        raise raised

    monkeypatch.setattr(data_cli, "_inspect", fail)
    assert data_cli.main(["inspect", "x.tar"]) == 2
    err = capsys.readouterr().err
    assert err == f"contrastive-data inspect: error: {raised}\n"


@pytest.mark.parametrize("internal", [ValueError("an internal invariant broke"), KeyError("missing")])
def test_data_cli_lets_other_exceptions_through(monkeypatch, internal):
    def fail(args):
        raise internal

    monkeypatch.setattr(data_cli, "_inspect", fail)
    with pytest.raises(type(internal)):
        data_cli.main(["inspect", "x.tar"])


def test_export_cli_catches_the_family_only(monkeypatch, capsys, tmp_path):
    def fail(*args, **kwargs):
        raise ConfigError("model.arch=cappa has no open_clip counterpart")

    monkeypatch.setattr(export_cli, "export_checkpoint", fail)
    assert export_cli.main(["--checkpoint", "c.pt", "--format", "bundle", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err == "contrastive-export: error: model.arch=cappa has no open_clip counterpart\n"

    def broken(*args, **kwargs):
        raise ValueError("internal")

    monkeypatch.setattr(export_cli, "export_checkpoint", broken)
    with pytest.raises(ValueError, match="internal"):
        export_cli.main(["--checkpoint", "c.pt", "--format", "bundle", "--out", str(tmp_path)])


def handled_exceptions(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ExceptHandler) and node.type is not None:
            types = node.type.elts if isinstance(node.type, ast.Tuple) else [node.type]
            names += [ast.unparse(t) for t in types]
    return names


@pytest.mark.parametrize("path", sorted(CLI.glob("*.py")), ids=lambda p: p.name)
def test_entry_points_catch_no_broad_exception(path):
    """Every entry point, contrastive-train and contrastive-eval included, on the source."""
    broad = {"ValueError", "Exception", "BaseException", "RuntimeError", "FloatingPointError"}
    assert not broad & set(handled_exceptions(path)), f"{path.name} catches {broad & set(handled_exceptions(path))}"
