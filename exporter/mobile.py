"""Mobile packaging (`export --ort`): the shipped graph in onnxruntime's ORT format, plus the list of operators and
types it needs, so an app can link a minimal onnxruntime build that holds only those kernels.

The conversion is onnxruntime's own (`onnxruntime.tools.convert_onnx_models_to_ort`, "Fixed" optimization style:
the graph optimized once at conversion, nothing left to do at load) with type reduction; its config is what
onnxruntime's `build.py --minimal_build --include_ops_by_config` takes. The ORT file is then checked like the
device would run it: in a fresh process, its greedy tokens against device_check.json, and its peak memory.

An ORT-format model is one flatbuffer that onnxruntime reads into memory, where the .onnx export's weights are
mapped from their data file, and it cannot store the tied embedding/lm_head table once for two shapes; both cost
resident memory, which is why the package's peak is measured and gated on the budget like the .onnx's.
"""

from __future__ import annotations

import contextlib
import io
import shutil
import tempfile
from pathlib import Path

from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

from exporter.contracts import Measurement, OrtPackage
from exporter.validate import run_measure

ORT_FILE = "model.ort"
OPERATORS_FILE = "required_operators_and_types.config"


def convert(model_file: Path, folder: Path) -> tuple[Path, Path]:
    """model.ort and its operator config, written into `folder` beside the .onnx."""
    with tempfile.TemporaryDirectory(dir=folder) as work, contextlib.redirect_stdout(io.StringIO()):
        convert_onnx_models_to_ort(model_file, output_dir=Path(work), optimization_styles=[OptimizationStyle.Fixed],
                                   enable_type_reduction=True)
        converted = Path(work) / model_file.with_suffix(".ort").name
        config = next(Path(work).glob("*.config"))
        shutil.move(converted, folder / ORT_FILE)
        lines = [f"# - {ORT_FILE}" if line.startswith("# - ") else line  # not the temporary folder's path
                 for line in config.read_text().splitlines()]
        (folder / OPERATORS_FILE).write_text("\n".join(lines) + "\n")
    return folder / ORT_FILE, folder / OPERATORS_FILE


def package(model_file: Path, folder: Path, threads: int) -> OrtPackage:
    """Convert, then run the ORT file as the device would."""
    ort_file, operators_file = convert(model_file, folder)
    result = run_measure([str(folder), "--graph", ORT_FILE, "--threads", str(threads), "--runs", "3"])
    operators = tuple(line.strip() for line in operators_file.read_text().splitlines()
                      if line.strip() and not line.startswith("#"))
    return OrtPackage(model_file=ort_file.name, operators_file=operators_file.name,
                      model_bytes=ort_file.stat().st_size, operator_lines=operators,
                      tokens_identical=result["parity"]["identical"], same_prefix=result["parity"]["same_prefix"],
                      greedy_steps=len(result["parity"]["expected"]), measurement=Measurement(**result["measurement"]))
