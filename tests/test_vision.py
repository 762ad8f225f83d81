"""Vision transformers through the same engine: tiny random ViT, DeiT and DINOv2 classifiers that transformers
writes itself (several shards, transformers 4's stored names). Streamed Wanda and GBLM masks equal an in-memory
reference (the whole model, hooks, pruned layer by layer); the streamed per-image gradients equal full-model
autograd; the output loads with from_pretrained and gives the reference's logits; a killed run resumes
byte-identical; eval's top-1 and feature cosine equal the full model's; bad inputs exit 2 naming the file."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForImageClassification, Dinov2Config, Dinov2Model

from lowmem_gblm.calib.images import save_pixels
from lowmem_gblm.calib.samples import LABEL_SOURCES
from lowmem_gblm.config import CalibConfig, EvalConfig, GradientConfig, PruneConfig
from lowmem_gblm.engine import prune
from lowmem_gblm.engine.gradients import compute_gradients
from lowmem_gblm.errors import InputError
from lowmem_gblm.io.gradfiles import block_file
from lowmem_gblm.verify import verify
from lowmem_gblm.zeroshot.run import evaluate
from tests.reference import keep_from_score
from tests.tiny import VISION_CLASSES, VISION_SIZE, make_tiny_vision

N, LAYERS = 6, 3
SIZE, CLASSES = VISION_SIZE, VISION_CLASSES
REPO = Path(__file__).resolve().parents[1]
GRAD_TOL = 1e-5
KINDS = ("deit", "dinov2", "vit")


def make_vision(folder: Path, kind: str, seed: int = 0) -> Path:
    return make_tiny_vision(folder, kind, layers=LAYERS, seed=seed)


@pytest.fixture(scope="module", params=sorted(KINDS))
def vision_model(request, tmp_path_factory) -> tuple[str, Path]:
    return request.param, make_vision(tmp_path_factory.mktemp(request.param) / "model", request.param, seed=3)


@pytest.fixture(scope="module")
def pixels_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("px") / "pixels.safetensors"
    g = torch.Generator().manual_seed(7)
    save_pixels(path, torch.randn(N, 3, SIZE, SIZE, generator=g), torch.randint(0, CLASSES, (N,), generator=g))
    return path


def _pixels(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    t = load_file(str(path))
    return t["pixel_values"], t["labels"]


def _prune(model_dir: Path, out: Path, pixels: Path, **kw) -> dict:
    options = {"method": "wanda", "sparsity": 0.5, "device": "cpu", "progress": False, "batch_size": 4, **kw}
    calib = CalibConfig(pixels_file=str(pixels), nsamples=N)
    return prune(PruneConfig(model_dir=str(model_dir), out_dir=str(out), calib=calib, **options))


def _full(model_dir: Path):
    return AutoModelForImageClassification.from_pretrained(str(model_dir), dtype=torch.float32,
                                                           attn_implementation="sdpa").eval()


def _layers(model):
    base = getattr(model, model.base_model_prefix)
    return base.layers if hasattr(base, "layers") else base.encoder.layer


def _linears(model) -> dict[str, torch.nn.Linear]:
    """Every linear of the encoder layers by its full module name (the names reports and gradient files use)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "classifier"}


def reference_gradients(model_dir: Path, pixels: torch.Tensor, labels: torch.Tensor | None) -> dict:
    """Per-image autograd on the whole model: sum_n |g_n| by full weight name (labels None: the prediction)."""
    model = _full(model_dir)
    linears = _linears(model)
    l1 = {f"{n}.weight": torch.zeros_like(m.weight) for n, m in linears.items()}
    for n in range(pixels.shape[0]):
        model.zero_grad(set_to_none=True)
        logits = model(pixel_values=pixels[n:n + 1]).logits
        want = logits.argmax(-1).detach() if labels is None else labels[n:n + 1]
        torch.nn.functional.cross_entropy(logits, want).backward()
        for name, m in linears.items():
            l1[f"{name}.weight"] += m.weight.grad.abs()
    return l1


@torch.no_grad()
def inmemory_prune(model_dir: Path, pixels: torch.Tensor, method: str, grads: dict | None = None,
                   alpha: float = 100.0):
    """Wanda / GBLM as published, layer by layer on the whole model: sum x^2 of every linear's input over all
    images and tokens while the model (earlier layers already pruned) runs each image."""
    model = _full(model_dir)
    prefix = [n for n, m in model.named_modules() if m is _layers(model)][0]
    for i, layer in enumerate(_layers(model)):
        linears = {n: m for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
        sums = {n: torch.zeros(m.in_features) for n, m in linears.items()}
        hooks = []
        for n, m in linears.items():
            def hook(_m, args, _n=n, _sums=sums):
                x = args[0].reshape(-1, args[0].shape[-1])
                _sums[_n] += (x * x).sum(0)
            hooks.append(m.register_forward_pre_hook(hook))
        for k in range(pixels.shape[0]):
            model(pixel_values=pixels[k:k + 1])
        for h in hooks:
            h.remove()
        for n, m in linears.items():
            w = m.weight
            score = w.abs() * torch.sqrt(sums[n] / pixels.shape[0]).reshape(1, -1)
            if method == "gblm":
                score = score + alpha * w.abs() * grads[f"{prefix}.{i}.{n}.weight"]
            w.masked_fill_(~keep_from_score(score, "unstructured", 0.5), 0)
    return model


def _loaded(out: Path):
    model, info = AutoModelForImageClassification.from_pretrained(str(out), dtype=torch.float32,
                                                                  attn_implementation="sdpa",
                                                                  output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


def test_wanda_masks_and_logits_equal_the_in_memory_reference(vision_model, pixels_file, tmp_path):
    kind, model_dir = vision_model
    out = tmp_path / "out"
    report = _prune(model_dir, out, pixels_file)
    pixels, _ = _pixels(pixels_file)
    ref = inmemory_prune(model_dir, pixels, "wanda")
    loaded = _loaded(out)
    want = {n: m.weight for n, m in _linears(ref).items()}
    got = {n: m.weight for n, m in _linears(loaded).items()}
    assert sorted(got) == sorted(want) and len(got) == 6 * LAYERS
    for name, w in got.items():
        assert torch.equal(w, want[name]), f"{kind}: {name} differs"
    assert sorted(report["sparsity"]["per_linear"]) == sorted(f"{n}.weight" for n in got)
    assert report["sparsity"]["overall"] == pytest.approx(0.5)
    assert report["calibration"]["windows"] == [N, 3, SIZE, SIZE]
    assert report["calibration"]["labels"] == LABEL_SOURCES[True]
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixel_values=pixels).logits, ref(pixel_values=pixels).logits,
                                   rtol=1e-5, atol=1e-5)
    # the shards keep the names the input checkpoint (and transformers' save_pretrained) uses
    stored = set()
    for p in out.glob("model-*.safetensors"):
        stored |= set(load_file(str(p)))
    dense = set()
    for p in model_dir.glob("model-*.safetensors"):
        dense |= set(load_file(str(p)))
    assert stored == dense


@pytest.mark.parametrize("with_labels", [True, False])
def test_per_image_gradients_and_gblm_masks_equal_full_model_autograd(vision_model, pixels_file, tmp_path,
                                                                      with_labels):
    kind, model_dir = vision_model
    pixels, labels = _pixels(pixels_file)
    if not with_labels:  # no labels: cross-entropy against the dense model's own prediction
        pixels_file = tmp_path / "unlabeled.safetensors"
        save_pixels(pixels_file, pixels)
        labels = None
    folder = tmp_path / "grads"
    calib = CalibConfig(pixels_file=str(pixels_file), nsamples=N)
    compute_gradients(GradientConfig(model_dir=str(model_dir), out_dir=str(folder), calib=calib, device="cpu",
                                     progress=False, batch_size=4))
    want = reference_gradients(model_dir, pixels, labels)
    got = {}
    for i in range(LAYERS):
        got.update(load_file(str(folder / block_file(i))))
    assert sorted(got) == sorted(want)
    for name, g in got.items():
        err = float((g - want[name]).abs().max() / want[name].abs().max())
        assert err <= GRAD_TOL, (kind, name, err)
    report = _prune(model_dir, tmp_path / "out", pixels_file, method="gblm", gradients=str(folder))
    assert report["calibration"]["labels"] == LABEL_SOURCES[with_labels]
    ref = inmemory_prune(model_dir, pixels, "gblm", grads=want)
    loaded = _loaded(tmp_path / "out")
    want_w = {n: m.weight for n, m in _linears(ref).items()}
    for name, m in _linears(loaded).items():
        assert torch.equal(m.weight != 0, want_w[name] != 0), f"{kind}: GBLM mask of {name} differs"


def test_sigkill_then_resume_is_byte_identical(pixels_file, tmp_path):
    model_dir = make_vision(tmp_path / "model", "dinov2", seed=4)
    _prune(model_dir, tmp_path / "ref", pixels_file, method="sparsegpt", batch_size=1)
    out = tmp_path / "out"
    args = [sys.executable, "-m", "cli.main", "prune", str(model_dir), str(out), "--calib-pixels", str(pixels_file),
            "--nsamples", str(N), "--method", "sparsegpt", "--sparsity", "0.5", "--device", "cpu", "-q"]
    env = {k: v for k, v in os.environ.items() if k != "LOWMEM_TEST_CRASH_AT"}
    r = subprocess.run(args, env=dict(env, LOWMEM_TEST_CRASH_AT="block_done:1"), cwd=REPO, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == -signal.SIGKILL, r.stderr
    r = subprocess.run(args, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr

    def tree(root: Path) -> dict[str, bytes]:
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
                if p.is_file() and p.name not in ("prune_report.json", "lock")}

    assert tree(out) == tree(tmp_path / "ref")


def test_eval_top1_and_feature_cosine_equal_the_full_model(pixels_file, tmp_path):
    dense = make_vision(tmp_path / "dense", "dinov2", seed=5)
    out = tmp_path / "out"
    _prune(dense, out, pixels_file, method="magnitude")
    pixels, labels = _pixels(pixels_file)
    result = evaluate(EvalConfig(model_dir=str(out), pixels=str(pixels_file), reference=str(dense), device="cpu",
                                 progress=False, batch_size=4))
    full, pruned = _full(dense), _full(out)
    with torch.no_grad():
        top1 = float((pruned(pixel_values=pixels).logits.argmax(-1) == labels).float().mean())

        def features(model):
            h = model.dinov2(pixel_values=pixels).last_hidden_state  # after the final layernorm
            return torch.cat([h[:, 0], h[:, 1:].mean(1)], dim=1)

        cosine = float(torch.nn.functional.cosine_similarity(features(pruned), features(full), dim=1).mean())
    assert result["top1"] == pytest.approx(top1)
    assert result["feature_cosine"] == pytest.approx(cosine, rel=1e-5)
    assert result["sparsity"] == pytest.approx(0.5)
    assert result["images"] == N


def test_a_backbone_prunes_without_gradients_and_refuses_gblm(pixels_file, tmp_path):
    torch.manual_seed(0)
    config = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=SIZE, patch_size=7)
    Dinov2Model(config).save_pretrained(str(tmp_path / "backbone"))
    report = _prune(tmp_path / "backbone", tmp_path / "out", pixels_file)
    assert report["sparsity"]["overall"] == pytest.approx(0.5)
    with pytest.raises(InputError, match="backbone without a classifier"):
        _prune(tmp_path / "backbone", tmp_path / "out2", pixels_file, method="gblm")


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli.main", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300)


def test_bad_images_exit_2_naming_the_file(tmp_path):
    from PIL import Image

    model_dir = make_vision(tmp_path / "model", "vit", seed=1)
    good = tmp_path / "good" / "LABEL_0"  # a class of the model's config
    good.mkdir(parents=True)
    Image.new("RGB", (SIZE, SIZE), (10, 20, 30)).save(good / "a.png")
    truncated = tmp_path / "truncated" / "LABEL_0"
    truncated.mkdir(parents=True)
    Image.new("RGB", (64, 64), (1, 2, 3)).save(truncated / "t.png")
    (truncated / "t.png").write_bytes((truncated / "t.png").read_bytes()[:60])
    rgba = tmp_path / "rgba" / "LABEL_0"
    rgba.mkdir(parents=True)
    Image.new("RGBA", (SIZE, SIZE)).save(rgba / "alpha.png")
    (tmp_path / "empty").mkdir()

    def run(out: str, **calib):
        config = PruneConfig(model_dir=str(model_dir), out_dir=str(tmp_path / out), device="cpu", progress=False,
                             method="wanda", sparsity=0.5, calib=CalibConfig(**{"nsamples": 1} | calib))
        return prune(config)

    for folder, needle in {"truncated": "t.png", "rgba": "alpha.png", "empty": "holds no images"}.items():
        with pytest.raises(InputError, match=needle):
            run(f"out-{folder}", images=str(tmp_path / folder))
        assert not (tmp_path / f"out-{folder}" / "model.safetensors.index.json").exists()
    # images the model cannot take, and text calibration for a vision model, are refused up front
    with pytest.raises(InputError, match="vision transformer"):
        run("o1", source="x.txt")
    Image.new("RGB", (SIZE + 7, SIZE), (10, 20, 30)).save(good / "b.png")  # default preprocessing: 224 crops
    with pytest.raises(InputError, match="takes 28x28"):
        run("o2", images=str(tmp_path / "good"), nsamples=2)
    # through the CLI: one error line naming the file, exit code 2
    r = _cli("prune", str(model_dir), str(tmp_path / "o3"), "--calib-images", str(tmp_path / "truncated"),
             "--nsamples", "1", "--device", "cpu", "-q")
    assert r.returncode == 2 and r.stderr.startswith("error:") and "t.png" in r.stderr, r.stderr


def test_an_image_folder_calibrates_through_the_cli_with_its_class_labels(tmp_path):
    """ImageFolder in, default preprocessing (no preprocessor_config.json: 224x224 crops, which DINOv2 takes by
    interpolating its positions), class names the config does not know numbered in sorted order as asked
    (--renumber-labels); the run keeps the exact pixels."""
    from PIL import Image

    model_dir = make_vision(tmp_path / "model", "dinov2", seed=2)
    for cls, colour in (("ants", (200, 10, 10)), ("bees", (10, 200, 10))):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for k in range(2):
            Image.new("RGB", (40 + 8 * k, 32), colour).save(tmp_path / "imgs" / cls / f"{k}.png")
    out = tmp_path / "out"
    r = _cli("prune", str(model_dir), str(out), "--method", "gblm", "--calib-images", str(tmp_path / "imgs"),
             "--renumber-labels", "--nsamples", "4", "--device", "cpu", "-q")
    assert r.returncode == 0, r.stderr
    saved = load_file(str(out / "calibration_pixels.safetensors"))
    assert list(saved["pixel_values"].shape) == [4, 3, 224, 224]
    assert saved["labels"].tolist() == [0, 0, 1, 1]
    assert all(check.ok for check in verify(out))
    result = evaluate(EvalConfig(model_dir=str(out), images=str(tmp_path / "imgs"), reference=str(model_dir),
                                 device="cpu", progress=False, renumber_labels=True))
    assert result["images"] == 4 and 0 < result["feature_cosine"] < 1


def test_class_folders_keep_the_config_ids_and_bad_images_are_one_error_line(tmp_path):
    """Issue 32 case 4: class folders named as the config's labels (LABEL_1, LABEL_2 of a 3-class ViT) are classes 1
    and 2 in GBLM's loss and in eval's top-1 (they were renumbered 0 and 1); an unknown class, a 16-bit PNG (case 5)
    and a 15000x15000 PNG (case 14) are one error line and exit code 2 through the CLI."""
    from PIL import Image
    from typer.testing import CliRunner

    from cli.main import app
    from tests.test_images import bomb_png, png_16bit_rgb

    model_dir = make_vision(tmp_path / "model", "vit", seed=5)
    (model_dir / "preprocessor_config.json").write_text(
        '{"image_processor_type": "ViTImageProcessor", "do_resize": true, "size": {"height": 28, "width": 28}, '
        '"do_rescale": true, "rescale_factor": 0.00392156862745098, "do_normalize": true, '
        '"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}')
    g = torch.Generator().manual_seed(9)
    for cls in ("LABEL_1", "LABEL_2"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for k in range(2):
            noise = torch.randint(0, 256, (SIZE, SIZE, 3), generator=g, dtype=torch.uint8).numpy()
            Image.fromarray(noise).save(tmp_path / "imgs" / cls / f"{k}.png")
    out = tmp_path / "out"
    args = ["--method", "gblm", "--device", "cpu", "-q"]
    r = CliRunner().invoke(app, ["prune", str(model_dir), str(out), "--calib-images", str(tmp_path / "imgs"),
                                 "--nsamples", "4", *args])
    assert r.exit_code == 0, r.output
    saved = load_file(str(out / "calibration_pixels.safetensors"))
    assert saved["labels"].tolist() == [1, 1, 2, 2]
    with torch.no_grad():
        predicted = _full(model_dir)(pixel_values=saved["pixel_values"]).logits.argmax(1)
    result = evaluate(EvalConfig(model_dir=str(model_dir), images=str(tmp_path / "imgs"), device="cpu",
                                 progress=False))
    assert result["top1"] == pytest.approx(float((predicted == torch.tensor([1, 1, 2, 2])).float().mean()))
    # refused, one line each, naming the class or the file
    (tmp_path / "imgs" / "LABEL_2").rename(tmp_path / "imgs" / "ants")
    png_16bit_rgb(tmp_path / "deep" / "LABEL_1" / "d16.png")
    bomb_png(tmp_path / "big" / "LABEL_1" / "huge.png")
    for folder, needle in (("imgs", "class 'ants' is not one of the model's labels"), ("deep", "d16.png: 16 bits"),
                           ("big", "huge.png: too large")):
        r = CliRunner().invoke(app, ["prune", str(model_dir), str(tmp_path / f"o-{folder}"), "--calib-images",
                                     str(tmp_path / folder), "--nsamples", "1", *args])
        assert r.exit_code == 2 and r.output.startswith("error:") and needle in r.output, r.output
        assert len(r.output.strip().splitlines()) == 1, r.output
