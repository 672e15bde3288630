"""Readers of checkpoints and inputs: digests verified everywhere, `latest` kept inside the run, wrong files named.

5. embed, eval, every convert subcommand and model.init_from check the sha256 digests (meta.json's, or the
   `weights_sha256` of a backbone file's sidecar) before using the weights; `--no-verify` skips it with a warning.
6. `latest` naming a path outside OUTPUT/checkpoints, or a tag dir that resolves outside it, is refused.
7. A pack or a .json where a checkpoint belongs, a missing optional package, a bad override: one line naming
   what was found and what to do.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from megaface import cli
from megaface.checkpoint import find_checkpoint
from tests.conftest import QUICKSTART
from tests.support.fault_fixtures import flip_byte, megaface, one_error_line, train_checkpoint

DIGEST = "does not match"


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(a good run, a copy with one bit flipped in the DeepSpeed file, a synthetic data folder)."""
    root = tmp_path_factory.mktemp("readers")
    good = train_checkpoint(root)
    bad = root / "flipped"
    shutil.copytree(good, bad)
    shards = sorted((bad / "checkpoints").glob("step_*/ds/mp_rank_00_model_states.pt"))
    assert len(shards) == 1
    flip_byte(shards[0])
    syn = root / "syn"
    assert megaface(["pack", "synthetic", "--output", str(syn), "--identities", "4", "--images-per-identity", "2",
                     "--val-pairs", "8"]).returncode == 0
    return good, bad, syn


def _cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = cli.main(args)
    return code, capsys.readouterr().err


@pytest.mark.parametrize("args", [
    ["convert", "consolidate", "{ckpt}", "-o", "{out}/b.pt"],
    ["convert", "fc7", "{ckpt}", "--merge", "-o", "{out}/fc7.pt"],
    ["convert", "fc7", "{ckpt}", "--reshard", "2", "-o", "{out}/w2"],
    ["convert", "onnx", "{ckpt}", "-o", "{out}/m.onnx"],
    ["convert", "export-insightface", "{ckpt}", "-o", "{out}/a.pth"],
    ["convert", "export-oneflow", "{ckpt}", "-o", "{out}/snap"],
    ["convert", "export-mxnet", "{ckpt}", "-o", "{out}/prefix"],
])
def test_every_convert_subcommand_verifies(runs: tuple[Path, Path, Path], tmp_path: Path, args: list[str],
                                           capsys: pytest.CaptureFixture[str]) -> None:
    _, bad, _ = runs
    code, err = _cli([a.format(ckpt=bad, out=tmp_path) for a in args], capsys)
    assert code == 2 and DIGEST in err and "mp_rank_00_model_states.pt" in err and "--no-verify" in err, err
    assert err.count("\n") == 1 and list(tmp_path.iterdir()) == []  # nothing written


def test_embed_and_eval_verify_and_no_verify_warns(runs: tuple[Path, Path, Path], tmp_path: Path) -> None:
    good, bad, syn = runs
    out = tmp_path / "e.npy"
    line = one_error_line(megaface(["embed", "--checkpoint", str(bad), "--bin", str(syn / "val.bin"),
                                    "--output", str(out)]), "embed", 2)
    assert DIGEST in line and not out.exists()
    line = one_error_line(megaface(["eval", "--checkpoint", str(bad), "--bin", str(syn / "val.bin")]), "eval", 2)
    assert DIGEST in line
    result = megaface(["embed", "--checkpoint", str(bad), "--bin", str(syn / "val.bin"), "--output", str(out),
                       "--no-verify"])
    assert result.returncode == 0 and out.is_file(), result.stderr[-2000:]
    warnings = [ln for ln in result.stderr.splitlines() if "warning" in ln]
    assert len(warnings) == 1 and warnings[0].startswith("megaface embed: warning: --no-verify: ")
    result = megaface(["embed", "--checkpoint", str(good), "--bin", str(syn / "val.bin"), "--output", str(out)])
    assert result.returncode == 0 and "warning" not in result.stderr, result.stderr[-2000:]


def test_backbone_files_and_init_from_verify(runs: tuple[Path, Path, Path], tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    from megaface.models import build_model
    from megaface.train.build import load_initial_weights

    good, bad, _ = runs
    backbone = tmp_path / "b.safetensors"
    assert _cli(["convert", "consolidate", str(good), "-o", str(backbone)], capsys)[0] == 0
    assert '"weights_sha256"' in Path(f"{backbone}.json").read_text()
    model = build_model("mobilefacenet_tiny")
    load_initial_weights(model, str(backbone), "mobilefacenet_tiny")  # intact: loads
    load_initial_weights(model, str(good), "mobilefacenet_tiny")  # a checkpoint directory works too
    with pytest.raises(ValueError, match=DIGEST):
        load_initial_weights(model, str(bad), "mobilefacenet_tiny")
    flip_byte(backbone)
    with pytest.raises(ValueError, match=f"{DIGEST}.*b.safetensors.json"):
        load_initial_weights(model, str(backbone), "mobilefacenet_tiny")
    code, err = _cli(["convert", "onnx", str(backbone), "-o", str(tmp_path / "m.onnx")], capsys)
    assert code == 2 and DIGEST in err and err.count("\n") == 1


def test_latest_outside_the_run_is_refused(runs: tuple[Path, Path, Path], tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    good, _, _ = runs
    tag = find_checkpoint("latest", good)
    victim = tmp_path / "victim"
    (victim / "checkpoints").mkdir(parents=True)
    (victim / "checkpoints" / "latest").write_text(f"../../../{good.parent.name}/run/checkpoints/{tag.name}\n")
    assert (victim / "checkpoints" / (victim / "checkpoints" / "latest").read_text().strip()).is_dir()
    with pytest.raises(ValueError, match="not a checkpoint of this run"):
        find_checkpoint("latest", victim)
    code, err = _cli(["convert", "consolidate", str(victim), "-o", str(tmp_path / "b.pt")], capsys)
    assert code == 2 and "not a checkpoint of this run" in err and err.count("\n") == 1
    (victim / "checkpoints" / "latest").unlink()
    (victim / "checkpoints" / tag.name).symlink_to(tag.resolve())  # a tag that resolves into another run
    with pytest.raises(ValueError, match="outside"):
        find_checkpoint(str(victim))
    (victim / "checkpoints" / "latest").write_text(tag.name)
    with pytest.raises(ValueError, match="outside"):
        find_checkpoint("latest", victim)
    assert find_checkpoint(str(tag)) == tag  # a tag dir given explicitly is the directory given


@pytest.mark.parametrize("name, content, what", [
    ("val.bin", None, "is a .bin verification pack"),
    ("exp.json", b'{"network": "iresnet50"}\n', "is a JSON text file"),
    ("train.rec", None, "is a RecordIO pack (.rec)"),
])
def test_wrong_file_where_a_checkpoint_belongs(runs: tuple[Path, Path, Path], tmp_path: Path, name: str,
                                               content: bytes | None, what: str,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    _, _, syn = runs
    path = tmp_path / name
    path.write_bytes(content if content is not None else (syn / name).read_bytes())
    for args in (["convert", "onnx", str(path), "-o", str(tmp_path / "m.onnx")],
                 ["convert", "consolidate", str(path), "-o", str(tmp_path / "b.pt")],
                 ["convert", "inspect", str(path)]):
        code, err = _cli(args, capsys)
        assert code == 2 and what in err and "weights_only" not in err and err.count("\n") == 1, err
    from megaface.models import build_model
    from megaface.train.build import load_initial_weights

    with pytest.raises(ValueError, match=what.replace("(", r"\(").replace(")", r"\)")):
        load_initial_weights(build_model("mobilefacenet_tiny"), str(path), "mobilefacenet_tiny")


@pytest.mark.parametrize("module, extra", [("onnxruntime", "onnx"), ("onnx", "onnx")])
def test_missing_onnx_names_the_extra(runs: tuple[Path, Path, Path], tmp_path: Path, module: str, extra: str,
                                      monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    good, _, _ = runs
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now fails as if it were not installed
    code, err = _cli(["convert", "onnx", str(good), "-o", str(tmp_path / "m.onnx")], capsys)
    assert code == 1 and err.count("\n") == 1, err
    assert f"the optional package '{module}' is not installed: pip install 'megaface[{extra}]'" in err


def test_missing_matplotlib_and_mpi4py_name_the_extra(runs: tuple[Path, Path, Path], tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    from megaface.distributed import state as dist_state
    from megaface.eval.roc import plot_roc

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "mpi4py", None)
    with pytest.raises(ModuleNotFoundError) as caught:
        plot_roc({"a": ([0.0, 1.0], [0.0, 1.0])}, tmp_path / "roc.png")
    assert "pip install 'megaface[plot]'" in cli._missing_extra(caught.value)
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    with pytest.raises(ModuleNotFoundError) as caught:
        dist_state._mpi_rendezvous(dist_state.LaunchEnv(0, 2, 0, 2, "mpirun"))
    line = cli._missing_extra(caught.value)
    assert "'mpi4py' is not installed (launched by MPI (mpirun)" in line and "megaface[mpi]" in line
    assert cli._missing_extra(ModuleNotFoundError("No module named 'nope'", name="nope")) is None  # a bug: traceback


def test_bad_override_names_the_key(tmp_path: Path) -> None:
    line = one_error_line(megaface(["train", "--config", str(QUICKSTART), "--optim.milestones=[1,2",
                                    "--output", str(tmp_path / "o")]), "train", 2)
    assert "'optim.milestones'" in line and "not valid YAML" in line and "--optim.milestones=[1,2]" in line
