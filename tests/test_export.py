"""ONNX export and the onnxruntime / torch predictors: parity per method, metadata, errors, CLI."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from PIL import Image
from safetensors.torch import save_file
from torch import Tensor

import edgecl
from edgecl.backbone import FrozenViT, load_backbone
from edgecl.cli import main
from edgecl.data import synthetic_stream, write_synthetic_folder
from edgecl.export import (
    PARITY_TOLERANCE,
    ExportError,
    ExportInfo,
    ModelFileError,
    ModelInfo,
    OnnxPredictor,
    TorchPredictor,
    export_checkpoint,
    export_model,
    exportable_reason,
    open_predictor,
    read_onnx_info,
    topk,
)
from edgecl.methods import Method, MethodConfig, TaskInfo, create_method, get_method_class, list_methods
from edgecl.train import TrainConfig, Trainer
from edgecl.train.model_io import LoadedModel, load_model
from tests.conftest import SHARED_DATA, SHARED_WEIGHTS, narrow_vit, needs_shared

METHODS = list_methods()
EXPORTABLE = [m for m in METHODS if exportable_reason(m) is None]
UNEXPORTABLE = [m for m in METHODS if exportable_reason(m) is not None]
OVERRIDES = {"expected_tasks": 2, "pool_size": 10}


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    """Tiny models on shared cores: one intra-op thread is as fast and not oversubscribed."""
    torch.set_num_threads(1)


def _overrides(name: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """OVERRIDES restricted to the fields the method's config has."""
    fields = set(get_method_class(name).Config.model_fields)
    return {k: v for k, v in {**OVERRIDES, **(extra or {})}.items() if k in fields}


def _images(n: int, size: int, seed: int) -> Tensor:
    """Eval-transformed random images (mean/std 0.5)."""
    return (torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) - 0.5) / 0.5


class Zoo:
    """Trained checkpoints and their exports, built once per module on demand.

    The per-method sweep runs on a 6-block ViT of width 96 (every method's default prompt layers fit),
    passed to ``load_model`` directly: exporting is linear in depth and the sweep must stay fast. The
    CLI, metadata and predictor tests use the 12-block ViT-Tiny (32 px, patch 8) from a weights file, so
    their checkpoints rebuild their backbone from the checkpoint alone.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.sweep_backbone = narrow_vit("vit_sweep_test")
        torch.manual_seed(0)
        tiny = load_backbone("vit_tiny_patch16_224", img_size=32, patch_size=8)
        self.weights = root / "tiny_vit.safetensors"
        save_file({k: v.contiguous() for k, v in tiny.vit.state_dict().items()}, str(self.weights))
        self._exports: dict[str, tuple[LoadedModel, ExportInfo]] = {}
        self._onnx: dict[Path, OnnxPredictor] = {}
        self._cli_export: Path | None = None
        self.cli_export_output = ""

    def checkpoint(self, name: str, sweep: bool = True) -> Path:
        """``name`` trained on 2 synthetic tasks of 2 classes (1 epoch): its model directory."""
        out = self.root / f"ckpt-{name}-{'sweep' if sweep else 'tiny'}"
        if not (out / "checkpoint.json").is_file():
            bb = (
                self.sweep_backbone
                if sweep
                else load_backbone("vit_tiny_patch16_224", img_size=32, patch_size=8, weights=self.weights)
            )
            torch.manual_seed(0)
            method = create_method(name, bb, _overrides(name))
            stream = synthetic_stream(2, classes_per_task=2, per_class=8, test_per_class=2)
            Trainer(method, stream, TrainConfig(epochs=1, batch_size=8, model_dir=str(out))).fit()
        return out

    def exported(self, name: str) -> tuple[LoadedModel, ExportInfo]:
        """The loaded sweep checkpoint of ``name`` and its export."""
        if name not in self._exports:
            model = load_model(self.checkpoint(name), backbone=self.sweep_backbone)
            self._exports[name] = (model, export_model(model, self.root / f"{name}.onnx"))
        return self._exports[name]

    def cli_export(self) -> Path:
        """cps_prompt on ViT-Tiny, exported once with ``edgecl export`` (its output kept)."""
        if self._cli_export is None:
            out = self.root / "cli" / "cps_prompt.onnx"
            buf = io.StringIO()
            with contextlib.redirect_stdout(buf):
                rc = main(
                    [
                        "export",
                        "--checkpoint",
                        str(self.checkpoint("cps_prompt", sweep=False)),
                        "--out",
                        str(out),
                    ]
                )
            assert rc == 0
            self._cli_export, self.cli_export_output = out, buf.getvalue()
        return self._cli_export

    def onnx(self, path: Path) -> OnnxPredictor:
        """One onnxruntime predictor per file."""
        if path not in self._onnx:
            self._onnx[path] = OnnxPredictor(path, threads=1)
        return self._onnx[path]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Zoo:
    """Shared trained models and exports for this module."""
    torch.set_num_threads(1)
    return Zoo(tmp_path_factory.mktemp("export"))


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SYNTHETIC 32 px PNGs, one per class, in ImageFolder layout."""
    root = tmp_path_factory.mktemp("images")
    write_synthetic_folder(root, 4, 1, img_size=32, split="test")
    return root


def _image_files(root: Path) -> list[str]:
    return sorted(str(p) for p in root.rglob("*.png"))


# ---- parity per method ------------------------------------------------------------------------
@pytest.mark.parametrize("name", EXPORTABLE)
def test_export_parity_and_dynamic_batch(zoo: Zoo, name: str) -> None:
    model, info = zoo.exported(name)
    assert info.parity_max_abs <= PARITY_TOLERANCE and info.top1_agree
    proto = onnx.load(str(info.path))
    onnx.checker.check_model(proto)
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 17
    batch_dim = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.HasField("dim_value")
    _assert_parity(zoo.onnx(info.path), TorchPredictor(model))


def _clear_rows(ref: torch.Tensor, tolerance: float = PARITY_TOLERANCE) -> torch.Tensor:
    """Rows whose top-1 leads the runner-up by more than twice the parity tolerance: there, logits within
    the tolerance cannot rank differently, whatever the round-off of the CPU."""
    top2 = ref.topk(2, dim=1).values
    return (top2[:, 0] - top2[:, 1]) > 2 * tolerance


def _assert_same_top1(got: torch.Tensor, ref: torch.Tensor) -> None:
    """Identical top-1 on every row the parity tolerance decides (a near-tie may go either way)."""
    clear = _clear_rows(ref)
    assert clear.any(), "every row a near-tie: the check would be empty"
    assert torch.equal(got.argmax(1)[clear], ref.argmax(1)[clear])


def _assert_parity(ort_pred: OnnxPredictor, torch_pred: TorchPredictor) -> None:
    """Logits within the tolerance and identical top-1 at batch sizes 1 and 7."""
    s = ort_pred.info.img_size
    for batch in (1, 7):
        x = _images(batch, s, seed=10 + batch)
        got, ref = ort_pred.logits(x), torch_pred.logits(x)
        assert got.shape == ref.shape == (batch, ort_pred.info.num_classes)
        assert float((got - ref).abs().max()) <= PARITY_TOLERANCE
        _assert_same_top1(got, ref)


@pytest.mark.parametrize("name", UNEXPORTABLE)
def test_unexportable_method_says_why(zoo: Zoo, name: str) -> None:
    torch.manual_seed(0)
    method = create_method(name, zoo.sweep_backbone, _overrides(name))
    method.begin_task(TaskInfo(0, [0, 1], 0))
    method.eval()
    with pytest.raises(ExportError, match=f"method '{name}' cannot be exported to ONNX") as err:
        export_model(LoadedModel(method, ["a", "b"], {}), zoo.root / f"{name}.onnx")
    assert str(exportable_reason(name)) in str(err.value)
    assert not (zoo.root / f"{name}.onnx").exists()


def test_exportability_is_declared_on_the_method_class() -> None:
    import edgecl.export as export_pkg

    assert not hasattr(export_pkg, "NOT_EXPORTABLE")  # no name-keyed table
    assert "dpw" in UNEXPORTABLE and {"cps_prompt", "hash", "coda_prompt"} <= set(EXPORTABLE)
    for name in METHODS:
        cls = get_method_class(name)
        assert exportable_reason(name) == cls.export_problem() == exportable_reason(cls)
    for name in UNEXPORTABLE:
        assert len(str(exportable_reason(name))) > 40, f"{name}: give the reason, not just a name"


# ---- the generic guards, on toy methods ---------------------------------------------------------
_SOLVE, _INVERSE = torch.linalg.solve, torch.inverse


class _Toy(Method):
    """A head over channel means of the pixels (no backbone pass), with one switchable extra step."""

    def __init__(self, backbone: FrozenViT, mode: str) -> None:
        super().__init__(backbone, MethodConfig())
        self.mode = mode
        self.register_buffer("cov", torch.eye(backbone.embed_dim, dtype=torch.float64) * 2.0)
        self.begin_task(TaskInfo(0, [0, 1, 2], 0))

    def features(self, x: Tensor) -> Tensor:
        """Channel means tiled to the embedding width, then the mode's step."""
        d = self.backbone.embed_dim
        f = x.mean(dim=(2, 3)).repeat(1, d // 3 + 1)[:, :d]
        if self.mode == "baked_python_float":
            return f * float(x.abs().sum())  # a Python number: frozen at trace time
        if self.mode == "solve_on_buffer":
            return f @ torch.linalg.solve(self.cov, torch.eye(d, dtype=torch.float64)).float()
        if self.mode == "unpatched":
            assert torch.linalg.solve is _SOLVE and torch.inverse is _INVERSE, "torch patched while tracing"
        if self.mode == "solve_on_input":
            return torch.linalg.solve(self.cov.float(), f.T).T
        return f


def _toy_export(zoo: Zoo, mode: str) -> ExportInfo:
    method = _Toy(zoo.sweep_backbone, mode).eval()
    model = LoadedModel(method, ["a", "b", "c"], {"seq": 1, "task": 0})
    return export_model(model, zoo.root / f"toy-{mode}.onnx")


def test_no_torch_function_is_patched_while_tracing(zoo: Zoo) -> None:
    info = _toy_export(zoo, "unpatched")
    assert info.parity_max_abs <= PARITY_TOLERANCE and info.exporter == "torchscript"


def test_any_unsupported_op_fails_clearly_even_on_buffers(zoo: Zoo) -> None:
    """Nothing is folded behind the method's back: it must keep such solves out of its forward (as the Hash
    task identifier does, with its classifier solved at fit)."""
    with pytest.raises(ExportError, match="could not be exported to ONNX.*linalg_solve"):
        _toy_export(zoo, "solve_on_buffer")


def test_input_dependent_unsupported_op_fails_clearly(zoo: Zoo) -> None:
    with pytest.raises(ExportError, match="could not be exported to ONNX.*linalg_solve"):
        _toy_export(zoo, "solve_on_input")


def test_data_dependent_trace_fails_parity_and_keeps_old_file(zoo: Zoo) -> None:
    target = zoo.root / "toy-baked_python_float.onnx"
    target.write_bytes(b"previous model")
    with pytest.raises(ExportError, match="parity check failed.*data-dependent"):
        _toy_export(zoo, "baked_python_float")
    assert target.read_bytes() == b"previous model"
    assert not list(zoo.root.glob(".toy-*.tmp"))


# ---- CLI export, metadata, predictors (ViT-Tiny, rebuilt from the checkpoint) ----------------------
def test_cli_export_and_parity_on_vit_tiny(zoo: Zoo) -> None:
    path = zoo.cli_export()
    line = zoo.cli_export_output
    assert line.startswith("exported cps_prompt (4 classes, checkpoint seq") and "parity max" in line
    _assert_parity(zoo.onnx(path), TorchPredictor.from_checkpoint(zoo.checkpoint("cps_prompt", sweep=False)))


def test_metadata_round_trip(zoo: Zoo) -> None:
    path = zoo.cli_export()
    ckpt = zoo.checkpoint("cps_prompt", sweep=False)
    meta = json.loads((ckpt / "checkpoint.json").read_text())
    read = read_onnx_info(path)
    assert read.classes == meta["classes_learned"] and len(read.classes) == 4
    assert read.method == "cps_prompt"
    assert (read.img_size, read.patch_size, read.backbone) == (32, 8, "vit_tiny_patch16_224")
    assert read.mean == tuple(meta["backbone"]["mean"]) and read.std == tuple(meta["backbone"]["std"])
    assert (read.checkpoint_seq, read.checkpoint_task) == (meta["seq"], 1)
    assert read.edgecl_version == edgecl.__version__ and read.extra["opset"] == "17"
    props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    assert json.loads(props["classes"]) == read.classes and props["edgecl_format"] == "edgecl-onnx/1"
    assert props == read.to_metadata()
    assert zoo.onnx(path).info == read == ModelInfo.from_metadata(read.to_metadata(), "x")
    torch_info = TorchPredictor.from_checkpoint(ckpt).info
    assert dataclasses.replace(torch_info, extra=read.extra) == read


def test_predictor_inputs_agree(zoo: Zoo, image_dir: Path) -> None:
    path = zoo.cli_export()
    pred = zoo.onnx(path)
    files = _image_files(image_dir)
    probs, labels = pred.predict(files)
    assert probs.shape == (4, 4) and torch.allclose(probs.sum(1), torch.ones(4), atol=1e-5)
    assert labels == [pred.class_names[i] for i in probs.argmax(1).tolist()]
    pil = [Image.open(f) for f in files]
    uint8 = torch.stack([torch.from_numpy(np.array(p.convert("RGB"))).permute(2, 0, 1) for p in pil])
    for other in (pred.predict(pil)[0], pred.predict(uint8)[0], pred.predict(pred.preprocess(files))[0]):
        assert torch.allclose(other, probs, atol=1e-6)
    pred.batch_size = 3
    try:
        assert torch.allclose(pred.predict(files)[0], probs, atol=1e-6)  # chunks of 3 + 1
    finally:
        pred.batch_size = 32
    top = pred.predict_topk(files[0], k=3)
    assert len(top) == 1 and len(top[0]) == 3 and top[0][0][0] == labels[0]
    assert [p for _, p in top[0]] == sorted((p for _, p in top[0]), reverse=True)
    with pytest.raises(ValueError, match="eval-transformed"):
        pred.predict(torch.zeros(2, 3, 16, 16))
    with pytest.raises(FileNotFoundError, match="image not found"):
        pred.predict([str(image_dir / "missing.png")])
    with pytest.raises(ValueError, match=">= 1"):
        topk(probs, pred.class_names, 0)


def test_random_backbone_checkpoint_is_refused(zoo: Zoo, tmp_path: Path) -> None:
    ckpt = tmp_path / "random"
    shutil.copytree(zoo.checkpoint("cps_prompt", sweep=False), ckpt)
    meta = json.loads((ckpt / "checkpoint.json").read_text())
    meta["backbone"]["weights"] = None
    (ckpt / "checkpoint.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="randomly initialised backbone"):
        export_checkpoint(ckpt, tmp_path / "x.onnx")
    with pytest.raises(ValueError, match="randomly initialised backbone"):
        TorchPredictor.from_checkpoint(ckpt)


# ---- real images ------------------------------------------------------------------------------
@needs_shared
def test_parity_on_real_images(tmp_path: Path) -> None:
    bb = load_backbone("vit_tiny_patch16_224", img_size=64, patch_size=8, weights=SHARED_WEIGHTS)
    torch.manual_seed(0)
    method = create_method("cps_prompt", bb, _overrides("cps_prompt"))
    stream = synthetic_stream(1, classes_per_task=3, per_class=8, test_per_class=2, img_size=64)
    Trainer(method, stream, TrainConfig(epochs=1, batch_size=8, model_dir=str(tmp_path / "m"))).fit()
    model = load_model(tmp_path / "m", backbone=bb)
    info = export_model(model, tmp_path / "ref.onnx")
    assert info.parity_max_abs <= PARITY_TOLERANCE and info.img_size == 64
    classes = sorted(p for p in (SHARED_DATA / "val").iterdir() if p.is_dir())[:3]
    files = [str(f) for c in classes for f in sorted(c.glob("*.JPEG"))[:2]]
    assert len(files) == 6
    ort_pred, torch_pred = OnnxPredictor(info.path, threads=1), TorchPredictor(model)
    x = ort_pred.preprocess(files)
    assert x.shape == (6, 3, 64, 64) and torch.equal(x, torch_pred.preprocess(files))
    got, ref = ort_pred.logits(x), torch_pred.logits(x)
    assert float((got - ref).abs().max()) <= PARITY_TOLERANCE
    _assert_same_top1(got, ref)
    clear = _clear_rows(ref).tolist()
    ort_labels, torch_labels = ort_pred.predict(files)[1], torch_pred.predict(files)[1]
    assert [a for a, c in zip(ort_labels, clear, strict=True) if c] == [
        b for b, c in zip(torch_labels, clear, strict=True) if c
    ]


# ---- bad model files ----------------------------------------------------------------------------
def _plain_onnx(
    path: Path, hw: int, metadata: dict[str, str] | None = None, out_dim: int | None = None
) -> Path:
    """A small valid ONNX model (identity, or the mean per channel), optionally with metadata."""
    x = helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, hw, hw])
    if out_dim is None:
        node = helper.make_node("Identity", ["images"], ["logits"])
        y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3, hw, hw])
    else:
        node = helper.make_node("ReduceMean", ["images"], ["logits"], axes=[2, 3], keepdims=0)
        y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", out_dim])
    graph = helper.make_graph([node], "g", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    for key, value in (metadata or {}).items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(path))
    return path


def test_bad_model_files_give_clear_errors(zoo: Zoo, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing.onnx"):
        OnnxPredictor(tmp_path / "missing.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00\xffthis is not a protobuf" * 50)
    with pytest.raises(ModelFileError, match=r"junk\.onnx is not a valid ONNX model"):
        OnnxPredictor(junk)
    good = zoo.cli_export()
    cut = tmp_path / "truncated.onnx"
    cut.write_bytes(good.read_bytes()[:5000])
    with pytest.raises(ModelFileError, match=r"truncated\.onnx is not a valid ONNX model"):
        OnnxPredictor(cut)
    plain = _plain_onnx(tmp_path / "plain.onnx", 32)
    with pytest.raises(ModelFileError, match=r"plain\.onnx is an ONNX model but not an edgecl export"):
        OnnxPredictor(plain)
    with pytest.raises(ModelFileError, match="not an edgecl export"):
        read_onnx_info(plain)
    meta = read_onnx_info(good).to_metadata()
    wrong_size = _plain_onnx(tmp_path / "wrong_size.onnx", 16, meta, out_dim=4)
    with pytest.raises(ModelFileError, match=r"wrong_size\.onnx: input 'images' .*img_size=32"):
        OnnxPredictor(wrong_size)
    wrong_classes = _plain_onnx(tmp_path / "wrong_classes.onnx", 32, meta, out_dim=3)
    with pytest.raises(ModelFileError, match=r"wrong_classes\.onnx: output 'logits' .* 4 classes"):
        OnnxPredictor(wrong_classes)
    bad_meta = _plain_onnx(tmp_path / "bad_meta.onnx", 32, {**meta, "classes": "[1, 2"}, out_dim=4)
    with pytest.raises(ModelFileError, match=r"bad_meta\.onnx has invalid metadata classes"):
        OnnxPredictor(bad_meta)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        open_predictor(tmp_path)


# ---- CLI predict ----------------------------------------------------------------------------------
def test_cli_predict_lines_and_json(zoo: Zoo, image_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    onnx_path = zoo.cli_export()
    classes = zoo.onnx(onnx_path).class_names
    files = _image_files(image_dir)
    assert main(["predict", "--model", str(onnx_path), "--top-k", "3", *files]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(files)
    for line, path in zip(lines, files, strict=True):
        fields = line.split("\t")
        assert fields[0] == path and fields[1] in classes and len(fields) == 5
        rest = [f.rsplit("=", 1) for f in fields[3:]]
        probs = [float(fields[2])] + [float(p) for _, p in rest]
        assert all(label in classes for label, _ in rest) and probs == sorted(probs, reverse=True)
    ckpt = zoo.checkpoint("cps_prompt", sweep=False)
    assert main(["predict", "--model", str(ckpt), "--top-k", "3", str(image_dir)]) == 0
    torch_lines = capsys.readouterr().out.splitlines()
    assert [t.split("\t")[:2] for t in torch_lines] == [t.split("\t")[:2] for t in lines]
    assert main(["predict", "--model", str(onnx_path), "--json", "--top-k", "9", files[0]]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["engine"] == "onnxruntime" and doc["method"] == "cps_prompt" and doc["precision"] == "fp32"
    (pred,) = doc["predictions"]
    assert pred["image"] == files[0] and len(pred["top_k"]) == 4
    assert pred["label"] == pred["top_k"][0]["label"] and pred["prob"] == pred["top_k"][0]["prob"]


def test_cli_errors(zoo: Zoo, image_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    junk = tmp_path / "junk.onnx"
    junk.write_text("not a model")
    assert main(["predict", "--model", str(junk), _image_files(image_dir)[0]]) == 2
    err = capsys.readouterr().err
    assert err.startswith("edgecl predict: error:") and str(junk) in err
    onnx_path = str(zoo.cli_export())
    assert main(["predict", "--model", onnx_path, str(tmp_path / "nope.jpg")]) == 2
    assert "image not found" in capsys.readouterr().err
    ckpt = str(zoo.checkpoint("cps_prompt", sweep=False))
    assert main(["export", "--checkpoint", ckpt, "--out", str(tmp_path / "m.onnx"), "--opset", "16"]) == 2
    assert "opset must be between 17" in capsys.readouterr().err
    assert main(["export", "--checkpoint", str(tmp_path / "none"), "--out", str(tmp_path / "m.onnx")]) == 2
    assert "no checkpoint" in capsys.readouterr().err


def test_cli_export_variants(zoo: Zoo, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = str(zoo.checkpoint("cps_prompt", sweep=False))
    out = tmp_path / "q.onnx"
    assert main(["export", "--checkpoint", ckpt, "--out", str(out), "--quantize", "int8"]) == 0
    line = capsys.readouterr().out
    assert " MB int8, opset 17 (torchscript)" in line and "top-1 agreement" in line, line
    assert read_onnx_info(out).extra["precision"] == "int8"
    assert out.stat().st_size < 0.6 * zoo.cli_export().stat().st_size
    with pytest.raises(SystemExit):
        main(["export", "--checkpoint", ckpt, "--out", str(out), "--fp16", "--quantize", "int8"])
    assert "not allowed with argument" in capsys.readouterr().err
