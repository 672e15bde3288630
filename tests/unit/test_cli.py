"""The `megaface` entry point: dispatch, the launcher's --local_rank, and one-line user errors."""

from __future__ import annotations

import os

import pytest

from megaface import cli


def test_usage_and_unknown_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--help"]) == 0
    assert "train" in capsys.readouterr().out
    assert cli.main(["trian"]) == 2
    assert "did you mean 'train'" in capsys.readouterr().err


def test_local_rank_before_the_subcommand_is_taken(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert cli._take_local_rank(["--local_rank=1", "train", "--x"]) == ["train", "--x"]
    assert os.environ["LOCAL_RANK"] == "1"
    assert cli._take_local_rank(["--local-rank", "1", "eval"]) == ["eval"]
    with pytest.raises(SystemExit, match="integer local rank"):
        cli._take_local_rank(["--local_rank=a", "train"])


def test_user_errors_print_one_line(capsys: pytest.CaptureFixture[str], tmp_path) -> None:
    missing = tmp_path / "nope.bin"
    assert cli.main(["eval", "--checkpoint", str(tmp_path), "--bin", str(missing)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("megaface eval: error:") and "nope.bin" in err and "Traceback" not in err
