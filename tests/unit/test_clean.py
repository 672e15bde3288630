"""`megaface.eval.clean` on constructed arrays: dominant sub-centers, angles, the two drop reasons, renumbering."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megaface.eval import clean


def _rows(angles_deg: list[float]) -> torch.Tensor:
    """Unit rows in the (x, y) plane at the given angles from the x axis, padded to D = 3."""
    a = np.radians(angles_deg)
    return torch.tensor(np.stack([np.cos(a), np.sin(a), np.zeros_like(a)], axis=1), dtype=torch.float32)


def _emb(angles_deg: list[float], norms: list[float] | None = None) -> np.ndarray:
    e = _rows(angles_deg).numpy() * np.asarray(norms or [1.0] * len(angles_deg), np.float32)[:, None]
    return e.astype(np.float32)


def test_dominant_subcenter_is_the_majority_not_the_first_row() -> None:
    # class 0: sub-centers at 0, 90, 180 deg; class 1: at 0, 120, 240 deg (K = 3)
    weight = torch.cat([_rows([0, 90, 180]), _rows([0, 120, 240])]) * 5.0  # norms must not matter
    # class 0: three samples near 90 (row 1), one near 0; class 1: one near 0, one near 240 (a tie -> row 0)
    emb = _emb([85, 95, 100, 5, 10, 235], norms=[1, 2, 3, 4, 5, 6])
    labels = np.array([0, 0, 0, 0, 1, 1])
    cos = clean.subcenter_cosines(emb, labels, weight, 3)
    np.testing.assert_allclose(cos[0], np.cos(np.radians([85, 5, 95])), atol=1e-6)
    dominant = clean.dominant_subcenters(cos, labels, 2)
    assert dominant.tolist() == [1, 0]
    angles = clean.angles_to_dominant(cos, labels, dominant)
    np.testing.assert_allclose(angles, [5, 5, 10, 85, 10, 125], atol=1e-3)


def test_plan_drops_far_samples_then_small_classes_and_renumbers_densely() -> None:
    labels = np.array([0, 0, 0, 1, 1, 2, 2, 2, 3])
    angles = np.array([10, 80, 20, 76, 30, 5, 6, 7, 75.0])  # 75 itself is kept (strictly greater is dropped)
    plan = clean.plan_clean(angles, labels, num_classes=5, threshold_deg=75, min_images=2)
    assert plan.far.tolist() == [False, True, False, True, False, False, False, False, False]
    # class 1 keeps 1 image, class 3 keeps 1: both dropped; class 4 never had a sample
    assert plan.keep.tolist() == [True, False, True, False, False, True, True, True, False]
    assert plan.small.tolist() == [False, False, False, False, True, False, False, False, True]
    assert plan.new_label.tolist() == [0, -1, 1, -1, -1]
    assert (plan.classes_in, plan.small_classes) == (4, 2)
    assert plan.order(labels).tolist() == [0, 2, 5, 6, 7]


def test_written_order_groups_by_new_label_when_the_source_is_not_grouped() -> None:
    labels = np.array([2, 0, 2, 0])
    plan = clean.plan_clean(np.zeros(4), labels, num_classes=3, min_images=1)
    assert plan.order(labels).tolist() == [1, 3, 0, 2]
    assert plan.new_label.tolist() == [0, -1, 1]


def test_report_numbers_add_up() -> None:
    labels = np.array([0, 0, 0, 1, 1, 2, 2, 2, 3])
    angles = np.array([10, 80, 20, 76, 30, 5, 6, 7, 75.0])
    plan = clean.plan_clean(angles, labels, 4, 75, 2)
    out = clean.report(plan, angles, np.array([1, 0, 2, 0]), labels, 3, 75.0, 2, source="s")
    assert out["samples_in"] - out["samples_out"] == sum(out["samples_dropped"].values()) == 4
    assert (out["classes_in"], out["classes_out"], out["classes_dropped"]["small_class"]) == (4, 2, 2)
    assert out["dominant_subcenter_classes"] == [2, 1, 1]


@pytest.mark.parametrize(("threshold", "min_images"), [(0.0, 2), (181.0, 2), (75.0, 0)])
def test_bad_options_are_one_line_errors(threshold: float, min_images: int) -> None:
    with pytest.raises(ValueError, match="--threshold-deg|--min-images"):
        clean.check_options(threshold, min_images)


def test_k1_and_mismatched_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="subcenters=1.*--head.subcenters=3"):
        clean.check_subcenters(1, "ckpt")
    weight = _rows([0, 90, 180, 270])  # 2 classes x K = 2
    with pytest.raises(ValueError, match="label 2 outside"):
        clean.subcenter_cosines(_emb([0]), np.array([2]), weight, 2)
    with pytest.raises(ValueError, match="not a multiple"):
        clean.subcenter_cosines(_emb([0]), np.array([0]), weight, 3)
    with pytest.raises(ValueError, match="different runs"):
        clean.subcenter_cosines(np.zeros((1, 5), np.float32), np.array([0]), weight, 2)


def test_without_matplotlib_one_warning_names_the_extra(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    import json
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ModuleNotFoundError
    labels = np.array([0, 0, 1])
    angles = np.array([10.0, 80.0, 20.0])
    plan = clean.plan_clean(angles, labels, 2, 75, 1)
    summary = clean.report(plan, angles, np.array([0, 0]), labels, 3, 75.0, 1)
    with pytest.warns(UserWarning, match=r"pip install 'megaface\[plot\]'") as caught:
        clean.write_outputs(tmp_path, plan.order(labels), summary, angles, 75.0)
    assert len(caught) == 1 and "\n" not in str(caught[0].message)
    assert json.loads((tmp_path / clean.REPORT_FILE).read_text())["histogram"] is None
    assert np.load(tmp_path / clean.SOURCE_INDEX_FILE).tolist() == [0, 2]
    assert not (tmp_path / clean.HISTOGRAM_FILE).exists()
