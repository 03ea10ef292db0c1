"""Small on-disk corpora in every layout `alignlab data build` reads, and an in-process build (helpers
for the test_databuild_* modules; no tests here)."""
from __future__ import annotations

import io
import json
import os
import tarfile

import cv2
import numpy as np

KNOWN_CAPTION = "a man in a green shirt is standing in the crowd"
KNOWN_TUPLES = [["man"], ["shirt"], ["green", "shirt"], ["crowd"], ["man", "in", "shirt"], ["man", "in", "crowd"]]
CAPTIONS = [
    KNOWN_CAPTION,
    "two dogs play with a red ball on the grass",
    "a man in a red shirt rides a bike",
    "a woman in a green shirt is standing in the crowd",
]


def jpeg(seed: int, size: tuple[int, int] = (48, 64)) -> bytes:
    """A small coloured JPEG (H, W = size) with a bright rectangle, distinct per seed."""
    rng = np.random.default_rng(seed)
    img = np.full((*size, 3), rng.integers(0, 255, 3), np.uint8)
    img[8:30, 10:40] = rng.integers(0, 255, 3)
    ok, buf = cv2.imencode(".jpg", img)
    assert ok
    return buf.tobytes()


def write_images(folder: str, names: list[str]) -> None:
    os.makedirs(folder, exist_ok=True)
    for i, name in enumerate(names):
        with open(os.path.join(folder, name), "wb") as f:
            f.write(jpeg(i))


def flickr(root: str) -> str:
    """4 images x 2 captions; img3 is in no split file; img2's file is missing; one caption empty."""
    names = ["img0.jpg", "img1.jpg", "img3.jpg"]
    write_images(os.path.join(root, "images"), names)
    lines = []
    for i in range(4):
        for n in range(2):
            caption = CAPTIONS[(i + n) % 4] if (i, n) != (1, 1) else ""
            lines.append(f"img{i}.jpg#{n}\t{caption}")
    with open(os.path.join(root, "Flickr8k.token.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(root, "Flickr_8k.trainImages.txt"), "w") as f:
        f.write("img0.jpg\nimg1.jpg\n")
    with open(os.path.join(root, "Flickr_8k.devImages.txt"), "w") as f:
        f.write("img2.jpg\n")
    return root


def coco(root: str) -> str:
    """2 train images (64x48) with 2 captions each and ground-truth boxes; one duplicate caption id."""
    write_images(os.path.join(root, "train2017"), ["000001.jpg", "000002.jpg"])
    ann = os.path.join(root, "annotations")
    os.makedirs(ann, exist_ok=True)
    images = [{"id": 1, "file_name": "000001.jpg", "width": 64, "height": 48},
              {"id": 2, "file_name": "000002.jpg", "width": 64, "height": 48}]
    captions = [{"image_id": 1, "id": 10, "caption": CAPTIONS[0]}, {"image_id": 1, "id": 11, "caption": CAPTIONS[1]},
                {"image_id": 2, "id": 12, "caption": CAPTIONS[2]}, {"image_id": 2, "id": 12, "caption": CAPTIONS[3]}]
    instances = [
        # x, y, w, h in pixels; the second overhangs the right edge and must be clipped to 1.
        {"image_id": 1, "id": 100, "bbox": [10, 8, 30, 22], "category_id": 1, "area": 660, "iscrowd": 0},
        {"image_id": 1, "id": 101, "bbox": [40, 0, 40, 12], "category_id": 18, "area": 480, "iscrowd": 0},
        {"image_id": 2, "id": 102, "bbox": [0, 0, 32, 24], "category_id": 18, "area": 768, "iscrowd": 0},
    ]
    cats = [{"id": 1, "name": "person"}, {"id": 18, "name": "dog"}]
    with open(os.path.join(ann, "captions_train2017.json"), "w") as f:
        json.dump({"images": images, "annotations": captions}, f)
    with open(os.path.join(ann, "instances_train2017.json"), "w") as f:
        json.dump({"images": images, "annotations": instances, "categories": cats}, f)
    return root


def karpathy(root: str) -> str:
    """3 images in splits train / restval / test, 2 sentences each."""
    write_images(os.path.join(root, "val2014"), ["a.jpg", "b.jpg", "c.jpg"])
    images = [{"filepath": "val2014", "filename": name, "cocoid": 100 + i, "split": split,
               "sentences": [{"raw": CAPTIONS[i], "sentid": 2 * i}, {"raw": CAPTIONS[i + 1], "sentid": 2 * i + 1}]}
              for i, (name, split) in enumerate([("a.jpg", "train"), ("b.jpg", "restval"), ("c.jpg", "test")])]
    path = os.path.join(root, "dataset_coco.json")
    with open(path, "w") as f:
        json.dump({"dataset": "coco", "images": images}, f)
    return path


def csv_table(root: str) -> str:
    """4 rows: 2 good, 1 over-long caption, 1 undecodable image."""
    write_images(os.path.join(root, "pics"), ["p0.jpg", "p1.jpg"])
    with open(os.path.join(root, "pics", "broken.jpg"), "wb") as f:
        f.write(b"this is not a jpeg")
    path = os.path.join(root, "pairs.csv")
    long_caption = " ".join(["word"] * 120)
    with open(path, "w") as f:
        f.write("image,caption\n")
        f.write(f"pics/p0.jpg,{CAPTIONS[0]}\npics/p1.jpg,{CAPTIONS[1]}\n")
        f.write(f"pics/p1.jpg,{long_caption}\npics/broken.jpg,{CAPTIONS[2]}\n")
    return path


def jsonl_table(root: str) -> str:
    write_images(os.path.join(root, "pics"), ["q0.jpg", "q1.jpg"])
    path = os.path.join(root, "pairs.jsonl")
    with open(path, "w") as f:
        for i in range(2):
            f.write(json.dumps({"image_path": f"pics/q{i}.jpg", "text": CAPTIONS[i], "split": "val"}) + "\n")
    return path


def webdataset(root: str) -> str:
    """One img2dataset tar: 3 samples, the third without an image."""
    os.makedirs(root, exist_ok=True)
    path = os.path.join(root, "00000.tar")

    def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))

    with tarfile.open(path, "w") as tar:
        for i in range(3):
            key = f"{i:09d}"
            if i < 2:
                add(tar, f"{key}.jpg", jpeg(i))
            add(tar, f"{key}.txt", CAPTIONS[i].encode())
            add(tar, f"{key}.json", json.dumps({"key": key, "caption": CAPTIONS[i], "status": "success"}).encode())
    return root


def units_in_process(monkeypatch) -> None:
    """Builds from here on run their units in this process, one UnitBuilder, not through Ray Data."""
    from alignlab.platform.databuild import builder

    def run_units(units, cfg, on_done):
        worker = builder.UnitBuilder(cfg.__dict__)
        for unit in units:
            on_done({k: v[0] for k, v in worker({"unit": [json.dumps(unit)]}).items()})

    monkeypatch.setattr(builder, "_run_units", run_units)


def build_in_process(monkeypatch, cfg) -> dict:
    """``builder.build`` with its units run in this process (:func:`units_in_process`)."""
    from alignlab.platform.databuild import builder

    units_in_process(monkeypatch)
    return builder.build(cfg)
