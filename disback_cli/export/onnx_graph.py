"""`--format onnx`: the one-step graph x = G(z, class_labels) as one ONNX file.

The graph takes `z` (batch, *data_shape) and, for a class-conditional generator, one-hot
`class_labels` (batch, label_dim), both float32, and returns `x`; the batch is dynamic, sigma_init
and the input scale of G(z) = D(input_scale z, sigma_init) are constants inside it.

It is traced by `torch.onnx.export(dynamo=True)` (torch.export, then onnxscript's translation and
optimiser). The TorchScript exporter (`dynamo=False`) is deprecated in torch 2.13 and cannot export
NCSN++, whose resampling convolutions build their kernels in forward; torch.export traces every
EDM network with a symbolic batch, and writes the same bytes for the same generator in every run
and process. The exporter's notes on each node (the Python stack that made it, with the exporting
machine's file paths) are left out: the file is shared, and its bytes then depend on the
generator and the library versions only, not on where disback is installed.

Float32 only: the preconditioning computes in float32 on the CPU, and a half-precision graph would
be a different network whose accuracy nobody measured here. The weights are inside the file, so
it is one file that any ONNX runtime opens; protobuf holds at most 2 GB, and a larger generator is
refused before anything is written. The file goes through `ExportFolder.write_bytes` (not
`ONNXProgram.save`, which silently moves large weights to a second file): written atomically,
after `onnx.checker` passed those very bytes.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from typing import Any

import torch
from torch import nn

from disback_cli.config.export import ExportConfig
from disback_cli.errors import ConfigError, DisbackError
from disback_cli.export import ExportSource, Usage
from disback_cli.runtime.reporting import Reporter
from disback_cli.store.export_folder import ExportFolder

FILE = "generator.onnx"
MAX_PROTOBUF = 2**31 - 1  # bytes: protobuf's limit for one message, i.e. one ONNX file
GRAPH_MARGIN = 64 << 20  # room for the graph besides the weights, when checking before export
EXAMPLE_BATCH = 2  # torch.export specialises sizes 0 and 1; 2 keeps the batch symbolic
INSTALL_HINT = '--format onnx needs the onnx extra: pip install -e ".[onnx]"'


class _Graph(nn.Module):
    """G with its inputs named: torch.export traces tensors by argument, not `**cond`."""

    def __init__(self, generator: nn.Module) -> None:
        super().__init__()
        self.generator = generator

    def forward(self, z: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        cond = {} if class_labels is None else {"class_labels": class_labels}
        return self.generator(z, **cond)


class OnnxExport:
    description = "one ONNX file: the graph x = G(z, class_labels), weights inside, dynamic batch"

    def check(self, cfg: ExportConfig, source: ExportSource) -> None:
        try:
            import onnx  # noqa: F401
            import onnxscript  # noqa: F401  (torch.onnx.export(dynamo=True) translates with it)
        except ImportError:
            raise ConfigError(INSTALL_HINT) from None
        if cfg.dtype != "fp32":
            raise ConfigError(f"--format onnx writes float32 graphs only; drop --dtype {cfg.dtype}")
        if cfg.pipeline:
            raise ConfigError("--pipeline is for --format diffusers; --format onnx is one graph")
        module = source.generator
        weights = sum(t.numel() * 4 for t in [*module.parameters(), *module.buffers()])
        _refuse_if_too_large(weights + GRAPH_MARGIN)

    def write(
        self, cfg: ExportConfig, source: ExportSource, folder: ExportFolder, reporter: Reporter
    ) -> Usage:
        import onnx

        reporter.note(f"tracing the generator into an ONNX graph (opset {cfg.opset})")
        proto = _export(source, cfg.opset)
        _refuse_if_too_large(proto.ByteSize())
        data = proto.SerializeToString()
        try:
            onnx.checker.check_model(data, full_check=True)
        except onnx.checker.ValidationError as exc:
            raise DisbackError(f"the traced ONNX graph is not valid: {_first_line(exc)}") from exc
        sha = folder.write_bytes(FILE, data)
        return Usage(snippet=_snippet(source), facts=_facts(cfg, source, proto, sha, len(data)))


def _refuse_if_too_large(nbytes: int) -> None:
    if nbytes > MAX_PROTOBUF:
        raise DisbackError(
            f"--format onnx: the generator needs about {nbytes / 2**30:.1f} GiB, more than the "
            "2 GiB one ONNX file holds; export --format safetensors instead"
        )


def _export(source: ExportSource, opset: int):
    """The ModelProto of `_Graph(source.generator)`, traced with a symbolic batch."""
    spec, graph = source.spec, _Graph(source.generator).eval()
    batch = torch.export.Dim("batch")
    args: tuple[torch.Tensor, ...] = (torch.zeros(EXAMPLE_BATCH, *spec.data_shape),)
    dynamic: dict[str, Any] = {"z": {0: batch}}
    if spec.label_dim:
        args += (torch.eye(spec.label_dim)[torch.arange(EXAMPLE_BATCH) % spec.label_dim],)
        dynamic["class_labels"] = {0: batch}
    try:
        with _quiet(), torch.no_grad():
            program = torch.onnx.export(
                graph,
                args,
                dynamo=True,
                opset_version=opset,
                input_names=list(dynamic),
                output_names=["x"],
                dynamic_shapes=dynamic,
                verbose=False,
            )
    except Exception as exc:  # a network torch.export cannot trace: a registered architecture
        cause = exc
        while cause.__cause__ is not None:  # torch.onnx wraps what torch.export said
            cause = cause.__cause__
        raise DisbackError(
            f"the generator does not convert to ONNX: {type(cause).__name__}: {_first_line(cause)}"
        ) from exc
    proto = program.model_proto
    for node in [*proto.graph.node, *(n for f in proto.functions for n in f.node)]:
        node.ClearField("metadata_props")  # see the module docstring
    return proto


def _first_line(exc: BaseException) -> str:
    """Exporters' and checkers' messages run to pages; the CLI prints one line."""
    return (str(exc).strip().splitlines() or [""])[0][:300]


@contextlib.contextmanager
def _quiet():
    """The exporter warns, logs and prints about what is not the user's business (torchvision's
    operators it skips, how it names axes, the partial graph of a failed trace); keep the CLI's
    output to what disback says (disback itself does not log)."""
    disabled = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(disabled)


def _shapes(values) -> dict[str, list[int | str]]:
    """Each graph input or output's shape: sizes, or the name of a dynamic axis."""
    return {
        v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in values
    }


def _facts(cfg, source: ExportSource, proto, sha: str, size: int) -> dict[str, Any]:
    generator = source.generator
    return {
        "file": FILE,
        "sha256": sha,
        "bytes": size,
        "opset": cfg.opset,
        "dtype": "fp32",
        "inputs": _shapes(proto.graph.input),
        "outputs": _shapes(proto.graph.output),
        "fixed_in_graph": {
            "sigma_init": float(generator.sigma_init),
            "input_scale": float(generator.input_scale),
        },
    }


def _snippet(source: ExportSource) -> str:
    """onnxruntime drawing 16 samples: standard normal z, and random one-hot classes."""
    shape = ", ".join(map(str, (16, *source.spec.data_shape)))
    lines = [
        "import numpy as np",
        "import onnxruntime as ort",
        "",
        f'session = ort.InferenceSession("{FILE}", providers=["CPUExecutionProvider"])',
        "rng = np.random.default_rng(0)",
        f"z = rng.standard_normal(({shape}), dtype=np.float32)",
        'inputs = {"z": z}',
    ]
    if source.spec.label_dim:
        classes = source.spec.label_dim
        lines += [
            f"labels = rng.integers(0, {classes}, size=16)",
            f'inputs["class_labels"] = np.eye({classes}, dtype=np.float32)[labels]  # one-hot',
        ]
    lines.append('(x,) = session.run(["x"], inputs)')
    if len(source.spec.data_shape) == 3:
        lines += [
            "# (N, C, H, W) in [-1, 1] -> (N, H, W, C) uint8, as disback sample writes them",
            "images = (x * 127.5 + 128).clip(0, 255).astype(np.uint8).transpose(0, 2, 3, 1)",
        ]
    return "\n".join(lines) + "\n"
