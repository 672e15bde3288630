"""`megaface models`: the registry's names, and a network's cost measured on the built network."""

from __future__ import annotations

import pytest

from megaface.cli import main
from megaface.models import list_models


def test_lists_every_network(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models"]) == 0
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert names == list_models() and "iresnet100" in names


def test_profiles_a_network(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "mobilefacenet"]) == 0
    # the seed's fmobilefacenet: about 1.0 M parameters and 0.22 G multiply-adds (pinned in test_models.py)
    assert capsys.readouterr().out.strip() == ("mobilefacenet: 128-d, 1.00 M parameters, 0.221 G multiply-adds per "
                                               "112x112 image")


def test_unknown_network_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "iresnet101"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("megaface models: error: unknown network 'iresnet101'") and "\n" not in err
