"""What differs between a decoder language model and a vision encoder, for the engine: the calibration samples a
model takes, the loss its gradients start from, what its gradient folder records, and which evaluation it takes.
The engine asks the model's adapter (``adapter``) and never branches on the modality itself.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lowmem_gblm.calib.data import resolve_windows
from lowmem_gblm.calib.images import load_image_folder, load_pixels
from lowmem_gblm.calib.samples import Samples
from lowmem_gblm.config import CalibConfig
from lowmem_gblm.errors import InputError
from lowmem_gblm.io.model import StreamedModel
from lowmem_gblm.stream.backward import classifier_windows, head_windows

# (hidden states of windows n..n+count [B, T, D], n, count) -> (each window's loss [B] fp32, dL/dh [B, T, D])
GradientHead = Callable[[torch.Tensor, int, int], tuple[torch.Tensor, torch.Tensor]]


class _Modality:
    evaluations: tuple[str, ...]  # the eval flags this kind of model takes
    wrong_eval: str  # the refusal of any other ({model_dir}, {family})

    def refuse_eval(self, model: StreamedModel, model_dir: str, asked: str) -> None:
        """Refuse an evaluation this kind of model does not take (``asked``: --data/--tasks, or --images)."""
        if asked not in self.evaluations:
            raise InputError(self.wrong_eval.format(model_dir=model_dir, family=model.family.name))


class DecoderLM(_Modality):
    """A causal language model: token windows, the next-token loss, perplexity and lm-eval tasks."""

    evaluations = ("--data", "--tasks")
    wrong_eval = "{model_dir} is a language model ({family}): evaluate it with --data or --tasks"

    def samples(self, calib: CalibConfig, model: StreamedModel) -> Samples:
        if calib.images or calib.pixels_file:
            raise InputError(f"{model.root} is a language model ({model.family.name}): --calib-images / --calib-pixels "
                             "are for vision transformers; pass --calib or --calib-ids")
        max_pos = getattr(model.config, "max_position_embeddings", None)
        ids = resolve_windows(calib, model.root, int(model.config.vocab_size), max_pos, model.family.bos_per_window)
        if max_pos is not None and ids.shape[1] > max_pos:
            raise InputError(f"--seqlen {ids.shape[1]} exceeds the model's context ({max_pos} positions)")
        return Samples.of_ids(ids)

    def gradient_head(self, run) -> GradientHead:
        """The mean next-token loss of each window (``--head-chunk`` positions per head call)."""
        norm, head = run.model.load_head(run.device, run.dtype)  # head: [V, D]

        def windows(hidden: torch.Tensor, n: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
            targets = run.local_ids[n:n + count, 1:].to(run.device)
            return head_windows(norm, head, hidden, targets, run.device, run.dtype, run.config.head_chunk)

        return windows

    def gradient_record(self, run) -> dict:
        """What a gradient folder records beyond the losses."""
        return {}


class VisionEncoder(_Modality):
    """A vision transformer (classifier or backbone): images, the classifier's cross-entropy (on the labels, or
    the dense model's own prediction), top-1 and feature cosine."""

    evaluations = ("--images",)
    wrong_eval = ("{model_dir} is a vision transformer ({family}): --data and --tasks are for language models; "
                  "evaluate it with --images FOLDER or --pixels FILE")

    def samples(self, calib: CalibConfig, model: StreamedModel) -> Samples:
        if not (calib.images or calib.pixels_file):
            raise InputError(f"{model.root} is a vision transformer ({model.family.name}): pass --calib-images FOLDER "
                             "(class subfolders, or --calib-labels FILE) or --calib-pixels FILE.safetensors")
        if calib.images:
            # a backbone without a classifier does not use labels: its class names need no ids of the model's
            pixels, labels, _files = load_image_folder(calib.images, model.root, calib.nsamples, calib.seed,
                                                       labels_file=calib.labels_file,
                                                       renumber=calib.renumber_labels or not model.num_labels)
        else:
            pixels, labels = load_pixels(calib.pixels_file)
            if pixels.shape[0] < calib.nsamples:
                raise InputError(f"--calib-pixels {calib.pixels_file} holds {pixels.shape[0]} images; --nsamples "
                                 f"{calib.nsamples} needs at least that many")
            pixels, labels = pixels[:calib.nsamples], None if labels is None else labels[:calib.nsamples]
        samples = Samples.of_pixels(pixels, labels)
        model.seqlen(samples)  # refuses images the model cannot take
        if labels is not None and model.num_labels and (int(labels.min()) < 0 or
                                                        int(labels.max()) >= model.num_labels):
            raise InputError(f"calibration labels run from {int(labels.min())} to {int(labels.max())}; the model has "
                             f"{model.num_labels} classes")
        return samples

    def gradient_head(self, run) -> GradientHead:
        head, labels = run.model.load_classifier(run.device, run.dtype), run.local_samples.labels

        def windows(hidden: torch.Tensor, n: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
            want = None if labels is None else labels[n:n + count].to(run.device)
            loss, grad, _used = classifier_windows(head, hidden, want, run.device, run.dtype)
            return loss, grad

        return windows

    def gradient_record(self, run) -> dict:
        return {"labels": run.samples.label_source}


TEXT, VISION = DecoderLM(), VisionEncoder()


def adapter(model: StreamedModel) -> DecoderLM | VisionEncoder:
    """The model's modality adapter: its family row says which (io.layout.Family.vision)."""
    return VISION if model.family.vision else TEXT
