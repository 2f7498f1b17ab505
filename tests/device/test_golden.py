"""The golden check's two rules: the legacy one (``golden_atol``, every arg-max equal)
for packages without a rule, and ``int8-gap`` (tolerance = the int8 variant's own
quantization error), which lets another CPU's int8 kernels round differently but still
refuses a model that is not the one built."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from edgefleet.device.core.errors import ModelRejected
from edgefleet.device.runtime.backends import InferenceBackend
from edgefleet.device.runtime.golden import check_golden
from edgefleet.device.runtime.manifest import (
    GOLDEN_RULE_KEY,
    GoldenSample,
    InputSpec,
    Manifest,
    Normalization,
    Variant,
    load_package,
)
from edgefleet.device.runtime.predictor import Predictor
from edgefleet.models.build.golden import golden_tolerances
from tests.support.updates import assert_perturbed_int8_refused

F32 = npt.NDArray[np.float32]
#: Recorded int8 logits of three golden inputs: two clear answers and a near-tie (row 2).
WANT = np.array([[5.0, 1.0, 0.0], [0.0, 4.0, 1.0], [2.0, 2.1, 0.0]], dtype=np.float32)
#: The fp32 logits of the same inputs: int8 is off by at most 0.6, by 0.2 on average.
FP32 = WANT + np.array([[0.6, 0.0, 0.1], [0.0, -0.3, 0.2], [0.2, 0.2, -0.2]], np.float32)


class _Fixed(InferenceBackend):
    """A backend that answers ``logits`` whatever it is asked (what another CPU computes)."""

    name = "onnx"

    def __init__(self, logits: F32) -> None:
        self.logits = logits

    def run(self, x: F32) -> F32:
        return self.logits

    def run_raw(self, feed: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        return self.logits


def _manifest(*, rule: bool) -> Manifest:
    atol, rules = golden_tolerances({"onnx-int8": WANT, "onnx-fp32": FP32},
                                    {"onnx-int8": "int8", "onnx-fp32": "fp32"})
    return Manifest(
        name="m", version="1.0.0", task="t", created="2026-01-01T00:00:00+00:00",
        labels=["a", "b", "c"], input=InputSpec(shape=[1]),
        normalization=Normalization(mean=[0.0], std=[1.0]),
        variants={"onnx-int8": Variant(file="m.onnx", format="onnx", precision="int8")},
        default_variant="onnx-int8",
        golden=[GoldenSample(input=[0.0], label=0, logits={"onnx-int8": [float(v) for v in r]})
                for r in WANT],
        golden_atol=atol, extra={GOLDEN_RULE_KEY: rules} if rule else {}, files={})


def test_the_build_records_the_quantization_gap_never_below_the_old_tolerance() -> None:
    m = _manifest(rule=True)
    rule = m.golden_rule("onnx-int8")
    assert rule is not None and rule.rule == "int8-gap" and rule.reference == "onnx-fp32"
    assert m.golden_atol["onnx-int8"] == pytest.approx(0.25)  # 5 % of the largest logit
    assert rule.fp32_gap_max == pytest.approx(0.6) and rule.atol == pytest.approx(0.6)
    assert rule.fp32_gap_mean == pytest.approx(0.2)
    assert rule.mean_atol == pytest.approx(0.25)  # the old tolerance: never stricter
    assert rule.argmax_margin == pytest.approx(0.5)
    # fp32 variants keep the exact check and get no rule.
    atol, rules = golden_tolerances({"onnx-fp32": FP32}, {"onnx-fp32": "fp32"})
    assert atol == {"onnx-fp32": 1e-3} and rules == {}


def test_other_rounding_within_the_gap_passes_only_under_the_rule() -> None:
    # What a Pi computes: several logits off by up to 0.5 (above the old 0.25), the
    # near-tie flipped, every clear answer kept.
    pi = WANT + np.array([[0.5, -0.3, 0.0], [0.2, 0.0, -0.4], [0.05, -0.15, 0.0]], np.float32)
    assert check_golden(_manifest(rule=True), "onnx-int8", _Fixed(pi)) == pytest.approx(0.5)
    # An old manifest keeps its old meaning: refused.
    with pytest.raises(ModelRejected, match=r"max diff 0\.5 > 0\.25\)"):
        check_golden(_manifest(rule=False), "onnx-int8", _Fixed(pi))


@pytest.mark.parametrize(("delta", "why"), [
    # One logit beyond the largest gap.
    ([[0.7, 0, 0], [0, 0, 0], [0, 0, 0]], r"max diff 0\.7 > 0\.6, int8-gap rule"),
    # Every logit a little off (each within atol): another model, not other rounding.
    ([[0.3, -0.3, 0.3], [0.3, -0.3, 0.3], [0.3, -0.3, 0.3]], r"mean diff 0\.3 > 0\.25"),
    # Non-finite output.
    ([[np.nan, 0, 0], [0, 0, 0], [0, 0, 0]], "max diff inf"),
])
def test_the_rule_still_refuses(delta: list[list[float]], why: str) -> None:
    got = WANT + np.asarray(delta, dtype=np.float32)
    with pytest.raises(ModelRejected, match=why):
        check_golden(_manifest(rule=True), "onnx-int8", _Fixed(got))


def test_a_clear_answer_must_keep_its_arg_max() -> None:
    m = _manifest(rule=True)
    rule = m.extra[GOLDEN_RULE_KEY]["onnx-int8"]
    rule["atol"] = rule["mean_atol"] = 4.0  # so wide that only the arg-max criterion bites
    got = WANT.copy()
    got[2] = [2.1, 2.0, 0.0]  # the near-tie (margin 0.1 <= 0.5) may flip
    assert check_golden(m, "onnx-int8", _Fixed(got)) == pytest.approx(0.1)
    got[0] = [4.0, 4.2, 0.0]  # a clear answer (margin 4 > 0.5) may not
    with pytest.raises(ModelRejected, match="arg-max changed on golden input 0 whose margin"):
        check_golden(m, "onnx-int8", _Fixed(got))


def test_an_unknown_or_malformed_rule_falls_back_to_the_old_check() -> None:
    pi = WANT + np.float32(0.4)
    for bad in ({"rule": "int8-gap-v9", "atol": 9.0, "mean_atol": 9.0, "argmax_margin": 0.0},
                {"rule": "int8-gap", "atol": -1.0, "mean_atol": 9.0, "argmax_margin": 0.0},
                "not a rule"):
        m = _manifest(rule=True)
        m.extra[GOLDEN_RULE_KEY]["onnx-int8"] = bad
        assert m.golden_rule("onnx-int8") is None
        with pytest.raises(ModelRejected, match=r"max diff 0\.4 > 0\.25\)"):
            check_golden(m, "onnx-int8", _Fixed(pi))
    # A rule is for int8: one written for an fp32 variant is ignored.
    m = _manifest(rule=True)
    m.variants["onnx-int8"] = Variant(file="m.onnx", format="onnx", precision="fp32")
    assert m.golden_rule("onnx-int8") is None


@pytest.mark.slow
def test_a_package_with_perturbed_weights_is_still_refused(digits_package: Path,
                                                           tmp_path: Path) -> None:
    """The built-in package records a rule; its int8 weights with 10 % noise, re-hashed as
    a signer would, load nowhere."""
    m = load_package(digits_package)
    for name in ("onnx-int8", "tflite-int8"):
        rule = m.golden_rule(name)
        assert rule is not None and rule.atol >= m.golden_atol[name]
    pkg = assert_perturbed_int8_refused(digits_package, tmp_path / "pkg")
    assert Predictor.load(pkg, variant="tflite-int8", threads=1).variant == "tflite-int8"


@pytest.mark.slow
def test_an_old_manifest_keeps_the_old_check(digits_package: Path, tmp_path: Path) -> None:
    """A package written before rules (no ``extra.golden_rule``) is checked as before: it
    loads, and golden logits moved by more than ``golden_atol`` are refused."""
    pkg = tmp_path / "pkg"
    shutil.copytree(digits_package, pkg)
    raw = json.loads((pkg / "manifest.json").read_text())
    raw["extra"] = {}
    (pkg / "manifest.json").write_text(json.dumps(raw))
    assert Predictor.load(pkg, variant="onnx-int8", threads=1).manifest.golden_rule(
        "onnx-int8") is None
    atol = raw["golden_atol"]["onnx-int8"]
    raw["golden"][0]["logits"]["onnx-int8"][0] += 1.5 * atol
    (pkg / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ModelRejected, match=r"onnx-int8: golden inputs give different outputs "
                                            r"\(max diff"):
        Predictor.load(pkg, variant="onnx-int8", threads=1)
