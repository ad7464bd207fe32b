"""Export trained networks in forms that load without this package.

`<run_dir>/export/` holds
    model.pt    the network's plain state dict (tensors only: `torch.load(..., weights_only=True)`)
    model.json  the architecture (`ClassifierSpec`), the input convention and where the weights came from
    model.pt2   a `torch.export` program of the network in eval mode with a dynamic batch dimension:
                `torch.export.load("model.pt2").module()(images)` runs it with nothing but torch
                (written unless `export.program=false`; sweeps write it for their best trial only:
                torch.export's compiler stack costs ~15 CPU-seconds to import and trace, more than a tiny
                trial's training; `raytrain-ssl export RUN_DIR` writes it for any finished run)
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from raytrain_ssl.checkpointing import load_checkpoint
from raytrain_ssl.models.classifier import ClassifierSpec

log = logging.getLogger(__name__)

EXPORT_DIR = "export"
INPUT_CONVENTION = "float32 RGB in [0, 1], shape (N, 3, H, W), no mean/std normalisation (as SimCLR)"


def classifier_from_state(state: dict) -> torch.nn.Module:
    """The network of a fine-tune or distill checkpoint, with its weights, in eval mode."""
    model = ClassifierSpec.from_dict(state["spec"]).build()
    model.load_state_dict(state["model"])
    return model.eval()


def export_classifier(state: dict, out_dir: Path, image_size: int, source: str, program: bool = True) -> dict[str, str]:
    out_dir.mkdir(parents=True, exist_ok=True)
    model = classifier_from_state(state)
    files = {"state_dict": out_dir / "model.pt", "metadata": out_dir / "model.json"}
    torch.save(model.state_dict(), files["state_dict"])
    metadata = {
        "stage": state["stage"],
        "spec": state["spec"],
        "image_size": image_size,
        "input": INPUT_CONVENTION,
        "output": f"logits (N, {model.fc.out_features})",
        "source_checkpoint": source,
    }
    files["metadata"].write_text(json.dumps(metadata, indent=2))
    if program:
        files["program"] = out_dir / "model.pt2"
        export_program(model, image_size, files["program"])
    return {name: str(path) for name, path in files.items()}


def export_program(model: torch.nn.Module, image_size: int, path: Path) -> None:
    example = torch.rand(2, 3, image_size, image_size)
    program = torch.export.export(model, (example,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, path)


def export_run(summary: dict, program: bool = True) -> dict:
    """Export the final checkpoint of a finished fine-tune/distill run; records the files in result.json."""
    from raytrain_ssl.launch import RESULT_FILE

    if not summary.get("checkpoint"):
        return summary
    state = load_checkpoint(summary["checkpoint"])
    run_dir = Path(summary["run_dir"])
    image_size = state["config"]["data"]["image_size"]
    files = export_classifier(state, run_dir / EXPORT_DIR, image_size, summary["checkpoint"], program=program)
    summary = {**summary, "export": files}
    (run_dir / RESULT_FILE).write_text(json.dumps(summary, indent=2))
    log.info("exported %s", ", ".join(files.values()))
    return summary


def export_finished_run(run_dir: str | Path) -> dict:
    """`raytrain-ssl export RUN_DIR`: (re)write the export of a finished fine-tune/distill run, program
    included; returns its result.json with the files."""
    from raytrain_ssl.errors import ConfigError
    from raytrain_ssl.launch import RESULT_FILE

    result = Path(run_dir).expanduser().resolve() / RESULT_FILE
    if not result.is_file():
        raise ConfigError(f"export: {result.parent} is not a finished run (no {RESULT_FILE})")
    summary = json.loads(result.read_text())
    if summary.get("stage") not in ("finetune", "distill") or not summary.get("checkpoint"):
        raise ConfigError(f"export: {result.parent} is not a finished fine-tune or distill run with a checkpoint")
    return export_run({**summary, "run_dir": str(result.parent)}, program=True)
