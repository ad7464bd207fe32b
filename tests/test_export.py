"""Exported models load and run with torch alone (this package unimportable)."""

from __future__ import annotations

import json
import subprocess
import sys

import torch

from raytrain_ssl.export import classifier_from_state, export_classifier
from raytrain_ssl.models.classifier import ClassifierSpec, HeadSpec

LOAD_WITHOUT_PACKAGE = """
import sys, json, torch
sys.modules["raytrain_ssl"] = None  # any import of the package now fails
out = sys.argv[1]
state = torch.load(out + "/model.pt", weights_only=True)
meta = json.load(open(out + "/model.json"))
program = torch.export.load(out + "/model.pt2").module()
images = torch.load(out + "/images.pt", weights_only=True)
torch.save({"logits": program(images), "keys": sorted(state), "classes": meta["spec"]["num_classes"]}, out + "/out.pt")
"""


def test_export_runs_without_the_package(tmp_path):
    torch.manual_seed(0)
    spec = ClassifierSpec("r18_0.25x_sk1", True, 10, HeadSpec(None, 32, 3), 1)
    model = spec.build()
    model.fc.weight.data.normal_()
    state = {"stage": "finetune", "spec": spec.to_dict(), "model": model.state_dict()}
    files = export_classifier(state, tmp_path, image_size=16, source="test")
    assert json.loads((tmp_path / "model.json").read_text())["image_size"] == 16

    images = torch.rand(5, 3, 16, 16)  # a batch size other than the one exported with
    torch.save(images, tmp_path / "images.pt")
    subprocess.run([sys.executable, "-c", LOAD_WITHOUT_PACKAGE, str(tmp_path)], check=True, timeout=300)
    out = torch.load(tmp_path / "out.pt", weights_only=True)
    expected = classifier_from_state(state)(images)
    torch.testing.assert_close(out["logits"], expected)
    assert out["keys"] == sorted(model.state_dict()) and out["classes"] == 10
    assert set(files) == {"state_dict", "metadata", "program"}
