"""``waferlab export``: a run's model, calibration, operating point and unknown-pattern score, one ONNX file.

The graph takes uint8 maps (N, S, S) with values 0/1/2, already shrunk to the run's size S with the run's
resize rule (dynamic batch), and returns ``logits`` (scaled), ``probs`` (calibrated) and ``ood_score``. The
input contract (size, resize rule, encoding, class names, logit scale, temperature, thresholds, the run's
fingerprint) is JSON in the model's metadata under :data:`META_KEY`, so the file alone is enough to deploy.
A ``knn+wafer`` score's second part (classic wafer descriptors, which need connected components: no ONNX op)
is not in the graph: its ``ood_score`` output is the z-scored deep part, and the contract's ``wafer_part``
holds the statistics with which waferlab adds the z-scored descriptor part (:func:`finish_ood`); a foreign
runtime reading ``ood_score`` alone gets the deep part only, whose scale is not ``ood_threshold``'s.
``--quantize int8`` writes the network's ops in int8 (:mod:`waferlab.deploy.quantize`) and records that, its
calibration and its measured agreement with the float32 graph in the contract.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from waferlab.data.cache import LEGACY_RESIZE, check_resize
from waferlab.deploy import EXPORT_FORMATS, QUANTIZE_MODES
from waferlab.deploy.trust import Trust
from waferlab.engine.predict import InputSpec
from waferlab.errors import WaferlabError

if TYPE_CHECKING:
    from waferlab.deploy.quantize import QuantizeOptions

META_KEY = "waferlab"
CONTRACT_VERSION = 4  # 2: the quantisation fields and the resize rule; 3: wafer_part; 4: int8 thresholds
OUTPUTS = ("logits", "probs", "ood_score")
OPSET = 17


@dataclass
class Contract:
    """Everything a deployment needs to feed the model and read its outputs."""

    image_size: int
    encoding: str
    class_names: tuple[str, ...]
    logit_scale: float
    temperature: float
    none_threshold: float | None
    ood_threshold: float
    ood_method: str
    fingerprint: str
    model_name: str = ""
    quantization: str = QUANTIZE_MODES[0]  # "none": float32 throughout
    calibration_maps: int = 0  # maps the int8 activation ranges were calibrated on
    calibration_source: str = ""
    quantization_check: dict[str, Any] | None = None  # int8 vs float32, held-out maps (compare_outputs)
    # int8: the float32 thresholds and how they were moved to the int8 outputs (quantize.transfer_thresholds)
    threshold_transfer: dict[str, Any] | None = None
    version: int = CONTRACT_VERSION
    resize: str = LEGACY_RESIZE  # how maps shrink to image_size before the graph (a file without it: nearest)
    wafer_part: dict[str, Any] | None = None  # a knn+wafer score's descriptor part (:func:`wafer_part_of`)

    @cached_property
    def wafer_statistics(self) -> tuple[np.ndarray, np.ndarray, int, tuple[np.float32, np.float32]] | None:
        """:func:`wafer_arrays` of ``wafer_part`` (None without one), decoded from base64 once per contract
        (predict's backends hold one), not on every chunk."""
        return None if self.wafer_part is None else wafer_arrays(self.wafer_part)

    @property
    def spec(self) -> InputSpec:
        return InputSpec(self.image_size, self.encoding, tuple(self.class_names), self.logit_scale,
                         resize=self.resize)

    @classmethod
    def of(cls, spec: InputSpec, trust: Trust, model_name: str = "") -> Contract:
        return cls(spec.image_size, spec.encoding, tuple(spec.class_names), spec.logit_scale,
                   trust.temperature, trust.none_threshold, trust.ood_threshold, trust.scorer.method,
                   trust.fingerprint, model_name, resize=spec.resize, wafer_part=wafer_part_of(trust.scorer))


def wafer_part_of(scorer: Any) -> dict[str, Any] | None:
    """The statistics of a ``knn+wafer`` score's descriptor part as JSON (float32 arrays in base64, exact),
    None for another method."""
    import base64

    from waferlab.deploy.descriptors import DESCRIPTOR_NAMES

    if not scorer.needs_maps:
        return None
    a = scorer.arrays

    def b64(x: np.ndarray) -> str:
        return base64.b64encode(np.ascontiguousarray(x, "<f4").tobytes()).decode("ascii")

    return {"descriptors": list(DESCRIPTOR_NAMES), "k": int(scorer.k), "rows": int(len(a["wafer_bank"])),
            "fusion": [float(v) for v in a["fusion"][1]], "norm": b64(a["wafer_norm"]),
            "bank": b64(a["wafer_bank"])}


def finish_ood(contract: Contract, maps: np.ndarray, graph_score: np.ndarray,
               descriptors: np.ndarray | None = None) -> np.ndarray:
    """The final unknown-pattern score from the graph's ``ood_score``: itself, or for a ``knn+wafer``
    export plus the z-scored descriptor part of ``maps`` (as ``OODScorer.fuse`` sums the parts), from their
    wafer ``descriptors`` when they were computed ahead (predict's reader thread)."""
    from waferlab.deploy.ood import wafer_distance

    if contract.wafer_statistics is None or len(graph_score) == 0:
        return graph_score
    bank, norm, k, (mean, std) = contract.wafer_statistics
    if descriptors is None:
        from waferlab.deploy.descriptors import wafer_descriptors

        descriptors = wafer_descriptors(maps)
    elif len(descriptors) != len(graph_score):
        raise WaferlabError(f"unknown-pattern score: {len(descriptors)} maps' descriptors for "
                            f"{len(graph_score)} maps")
    z = (wafer_distance(descriptors, bank, norm, k) - mean) / std
    return (np.asarray(graph_score, np.float32) + z).astype(np.float32)


def wafer_arrays(part: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, int, tuple[np.float32, np.float32]]:
    """(bank, norm, k, (mean, std) of the part on the threshold's maps) from :func:`wafer_part_of`'s JSON;
    ValueError (or KeyError, TypeError) when it is unreadable or was written for other descriptors."""
    import base64

    from waferlab.deploy.descriptors import DESCRIPTOR_NAMES

    if list(part["descriptors"]) != list(DESCRIPTOR_NAMES):
        raise ValueError("its descriptors are not this waferlab's")
    cols, (mean, std) = len(DESCRIPTOR_NAMES), part["fusion"]
    norm = np.frombuffer(base64.b64decode(part["norm"], validate=True), "<f4").reshape(2, cols)
    rows = int(part["rows"])
    bank = np.frombuffer(base64.b64decode(part["bank"], validate=True), "<f4").reshape(rows, cols)
    return bank, norm, int(part["k"]), (np.float32(mean), np.float32(std))


class DeployGraph(nn.Module):
    """uint8 maps -> (scaled logits, calibrated probs, unknown-pattern score); the exported computation."""

    def __init__(self, model: nn.Module, contract: Contract, trust: Trust) -> None:
        super().__init__()
        self.model = model
        self.encoding = contract.encoding
        self.scale = float(contract.logit_scale)
        self.temperature = float(contract.temperature)
        self.method = trust.scorer.method
        self.k = int(trust.scorer.k)
        self.pool = trust.scorer.pool
        arrays = trust.scorer.arrays
        if self.method == "mahalanobis":
            w = np.asarray(arrays["whitener"], np.float64)
            self.register_buffer("whitener", torch.as_tensor(w, dtype=torch.float32))
            self.register_buffer("wmeans", torch.as_tensor(arrays["means"] @ w, dtype=torch.float32))
        elif self.method in ("knn", "knn+energy", "knn+wafer"):
            self.register_buffer("bank", torch.as_tensor(np.asarray(arrays["bank"], np.float32)))
            self.k = max(1, min(self.k, len(arrays["bank"])))
            if self.method != "knn":
                self.register_buffer("fusion", torch.as_tensor(np.asarray(arrays["fusion"], np.float32)))

    def forward(self, maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        from waferlab.data.encode import encode

        store: list[torch.Tensor] = []
        handle = self.model.cam_target_layer.register_forward_hook(lambda _m, _i, out: store.append(out))
        try:
            out = self.model(encode(maps, self.encoding))
        finally:
            handle.remove()
        logits = out.float().reshape(out.shape[0], -1) * self.scale
        z = logits / self.temperature
        probs = torch.softmax(z, dim=1)
        energy = -self.temperature * torch.logsumexp(z, dim=1)
        if self.method == "msp":
            score = 1.0 - probs.max(dim=1).values
        elif self.method == "maxlogit":
            score = -logits.max(dim=1).values
        elif self.method == "energy":
            score = energy
        else:
            f = _pooled(store[0].float(), self.pool)  # as ood.pooled of the engine's features
            f = f / f.norm(dim=1, keepdim=True).clamp_min(1e-12)
            if self.method in ("knn", "knn+energy", "knn+wafer"):  # as ood.knn_distance: k-th largest cosine
                kth = torch.topk(f @ self.bank.t(), self.k, dim=1).values[:, -1]
                score = torch.sqrt(torch.clamp(2.0 - 2.0 * kth, min=0.0))
                if self.method == "knn+energy":  # as OODScorer.score: z-scored parts, summed
                    parts = torch.stack([score, energy], dim=1)
                    score = ((parts - self.fusion[:, 0]) / self.fusion[:, 1]).sum(dim=1)
                elif self.method == "knn+wafer":  # the deep part z-scored; finish_ood adds the wafer part
                    score = (score - self.fusion[0, 0]) / self.fusion[0, 1]
            else:
                z = f @ self.whitener  # as ood.mahalanobis_min: differences of whitened vectors
                score = ((z[:, None, :] - self.wmeans[None, :, :]) ** 2).sum(dim=2).min(dim=1).values
        return logits, probs, score


def _pooled(fmap: torch.Tensor, pool: str) -> torch.Tensor:
    """The CAM-layer output pooled as ``ood.pooled`` reads the engine's (avg | max) features."""
    avg, top = (fmap.mean(dim=(2, 3)), fmap.amax(dim=(2, 3))) if fmap.dim() == 4 else (fmap.flatten(1),) * 2
    if pool == "avg":
        return avg
    if pool == "max":
        return top
    unit = [p / p.norm(dim=1, keepdim=True).clamp_min(1e-12) for p in (avg, top)]
    return torch.cat(unit, dim=1)


def inference_form(model: nn.Module) -> nn.Module:
    """The network as exported: SP&A-Net's fused copy (BN folded, closed-form SA; same outputs to float
    rounding, ~1.5x the maps/s on ONNX Runtime, ``benchmarks/model_zoo.py``), also inside the ``failpool``
    head (the default preset's), any other model as it is."""
    from waferlab.models.heads import FailPooled
    from waferlab.models.spanet import SPANet, fuse_for_inference

    if isinstance(model, FailPooled) and isinstance(model.model, SPANet):
        return FailPooled(fuse_for_inference(model.model), model.encoding)
    return fuse_for_inference(model) if isinstance(model, SPANet) else model


def export_onnx(model: nn.Module, contract: Contract, trust: Trust, out: str | Path) -> Path:
    """Write the float32 ONNX file (dynamic batch, contract in the metadata) atomically; returns its path."""
    return write_onnx(export_graph(model, contract, trust), contract, out)


def export_graph(model: nn.Module, contract: Contract, trust: Trust) -> Any:
    """The float32 :class:`DeployGraph` of ``model`` as an ``onnx.ModelProto`` (no metadata yet)."""
    import io
    import warnings

    import onnx

    graph = DeployGraph(inference_form(model.cpu().eval()), contract, trust).eval()
    example = torch.zeros((2, contract.image_size, contract.image_size), dtype=torch.uint8)
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(graph, (example,), buf, dynamo=False, input_names=["maps"],
                          output_names=list(OUTPUTS), opset_version=OPSET,
                          dynamic_axes={name: {0: "batch"} for name in ("maps", *OUTPUTS)})
    return onnx.load_from_string(buf.getvalue())


def write_onnx(proto: Any, contract: Contract, out: str | Path) -> Path:
    """Put ``contract`` into the graph's metadata and save it atomically; returns the path."""
    import onnx

    from waferlab.io import atomic_path

    out = Path(out)
    meta = proto.metadata_props.add()
    meta.key, meta.value = META_KEY, json.dumps(asdict(contract))
    int8 = "" if contract.quantization == QUANTIZE_MODES[0] else f" ({contract.quantization})"
    proto.doc_string = (f"waferlab {contract.model_name}{int8}: uint8 maps (N,{contract.image_size},"
                        f"{contract.image_size}) 0/1/2, shrunk with {contract.resize!r} -> logits, "
                        "calibrated probs, unknown-pattern score")
    with atomic_path(out) as tmp:
        onnx.save(proto, str(tmp))
    return out


def read_contract(path: str | Path, session: Any) -> Contract:
    """The contract in an ONNX file's metadata; a file without it is a one-line error."""
    return parse_contract(path, session.get_modelmeta().custom_metadata_map)


def contract_of_file(path: str | Path) -> Contract:
    """The contract of an ONNX file read without an onnxruntime session (the OpenVINO backend)."""
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - onnx raises its own (protobuf) exception types
        why = " ".join(str(exc).split())[:200]
        raise WaferlabError(f"{path}: not a loadable ONNX model ({why})") from None
    return parse_contract(path, {p.key: p.value for p in proto.metadata_props})


def parse_contract(path: str | Path, meta: dict[str, str]) -> Contract:
    """The contract in the metadata ``meta`` of the ONNX file ``path``."""
    if META_KEY not in meta:
        raise WaferlabError(f"{path}: field {META_KEY!r}: no waferlab metadata in the ONNX file (not written "
                            f"by 'waferlab export'); its input contract is unknown")
    try:
        obj = json.loads(meta[META_KEY])
        if int(obj.get("version", 0)) > CONTRACT_VERSION:
            raise WaferlabError(f"{path}: field {META_KEY!r}: contract version {obj.get('version')} is newer "
                                f"than this waferlab reads ({CONTRACT_VERSION})")
        obj["class_names"] = tuple(obj["class_names"])
        check_resize(obj.get("resize", LEGACY_RESIZE), f"{path}: field {META_KEY!r}.resize")
        contract = Contract(**obj)
    except WaferlabError:
        raise
    except (json.JSONDecodeError, TypeError, KeyError, AttributeError) as exc:
        raise WaferlabError(f"{path}: field {META_KEY!r}: unreadable waferlab metadata ({exc})") from None
    if contract.wafer_part is not None:
        try:
            contract.wafer_statistics  # noqa: B018 - decoded (and kept) here to check it
        except (KeyError, TypeError, ValueError) as exc:  # binascii.Error is a ValueError
            raise WaferlabError(f"{path}: field {META_KEY!r}.wafer_part: unreadable statistics of the "
                                f"unknown-pattern score's descriptor part ({exc})") from None
    return contract


def open_session(path: str | Path, threads: int | None = None, optimize: bool = True) -> tuple[Any, Contract]:
    """An onnxruntime session of an exported file and its contract (``optimize`` False: no graph
    optimisation, seconds faster to open, for a session that only checks the file)."""
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise WaferlabError(f"{path}: ONNX file not found")
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(path), sess_options=opts, providers=_providers(ort))
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
        why = " ".join(str(exc).split())[:200]
        raise WaferlabError(f"{path}: not a loadable ONNX model ({why})") from None
    contract = read_contract(path, session)
    names = [o.name for o in session.get_outputs()]
    if tuple(names) != OUTPUTS:
        raise WaferlabError(f"{path}: outputs {names}, expected {list(OUTPUTS)}")
    return session, contract


def _providers(ort: Any) -> list[str]:
    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


def run_session(session: Any, maps: np.ndarray, batch_size: int, contract: Contract | None = None,
                descriptors: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(logits, probs, ood_score) of uint8 maps at the contract's size, batch by batch; with the file's
    ``contract`` the score is the final one (:func:`finish_ood`, given the maps' wafer ``descriptors`` when
    they were computed ahead), else the graph's output."""
    outs: list[list[np.ndarray]] = [[], [], []]
    for start in range(0, len(maps), batch_size):
        res = session.run(None, {"maps": np.ascontiguousarray(maps[start:start + batch_size])})
        for acc, arr in zip(outs, res):
            acc.append(arr)
    if not outs[0]:
        return np.zeros((0, 0), np.float32), np.zeros((0, 0), np.float32), np.zeros(0, np.float32)
    logits, probs, ood = (np.concatenate(o) for o in outs)
    return logits, probs, ood if contract is None else finish_ood(contract, maps, ood, descriptors)


def export_name(quantization: str = QUANTIZE_MODES[0]) -> str:
    """File name of an export under ``RUN/exports/``: ``model.onnx``, or ``model-int8.onnx`` for an int8 one
    (so that it never replaces the float32 file that ``predict RUN --backend onnx`` reads)."""
    return "model.onnx" if quantization == QUANTIZE_MODES[0] else f"model-{quantization}.onnx"


def export_run(run_dir: str | Path, out: str | Path | None = None, fmt: str = "onnx",
               quantize: QuantizeOptions | None = None) -> Path:
    """Export a calibrated run (``waferlab export``), float32 or quantised; default output
    ``RUN/exports/`` + :func:`export_name`."""
    from waferlab.deploy.predict import check_writable
    from waferlab.deploy.quantize import QuantizeOptions, quantize_export
    from waferlab.deploy.trust import load_trust
    from waferlab.engine.run import Run

    quantize = quantize or QuantizeOptions()
    if fmt not in EXPORT_FORMATS:
        raise WaferlabError(f"--format {fmt!r}: choose one of {', '.join(EXPORT_FORMATS)}")
    quantize.check()
    run = Run.open(run_dir)
    trust = load_trust(run)
    target = Path(out) if out else run.file("exports/") / export_name(quantize.mode)
    if target.suffix.lower() != ".onnx":
        raise WaferlabError(f"{target}: the output of --format onnx must end in .onnx")
    check_writable(target)
    contract = Contract.of(run.spec(), trust, run.info.model_name)
    proto = export_graph(run.load_model("cpu"), contract, trust)
    if quantize.mode != QUANTIZE_MODES[0]:
        proto, contract = quantize_export(run, proto, contract, quantize)
    return write_onnx(proto, contract, target)
