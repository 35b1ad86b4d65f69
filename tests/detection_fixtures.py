"""Builders of detection fixtures in the layouts users bring: a VOC year folder, the labelImg layout
derived from it, a CSV of boxes, and a TFRecord of tf.train.Examples written with the real wire
format by hand (varints and length-delimited fields, record framing with masked CRC-32C), so no
TensorFlow is needed and nothing here shares code with the reader under test."""

from __future__ import annotations

import csv
import struct
import xml.etree.ElementTree as ET
from pathlib import Path

import crc32c
import numpy as np
from PIL import Image
from protowire import field, varint

CLASSES = ("cat", "dog")


def make_voc_year(root: Path, count: int = 8, seed: int = 0) -> Path:
    """A VOC year folder: noisy images with bright rectangles, one XML each (1-based inclusive
    boxes), the last object of image 2 marked difficult, ImageSets/Main/{train,val}.txt."""
    rng = np.random.default_rng(seed)
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    stems = []
    for i in range(count):
        w, h = int(rng.integers(72, 96)), int(rng.integers(56, 72))
        arr = rng.uniform(0, 90, (h, w, 3))
        objects = []
        for k in range(1 + i % 3):
            x0, y0 = int(rng.integers(1, w - 30)), int(rng.integers(1, h - 24))
            x1, y1 = x0 + int(rng.integers(12, 28)), y0 + int(rng.integers(10, 22))
            cls = CLASSES[(i + k) % 2]
            arr[y0 - 1:y1, x0 - 1:x1, 0 if cls == "cat" else 2] = 230
            objects.append((cls, x0, y0, x1, y1, int(i == 2 and k == 2)))
        stem = f"img_{i:03d}"
        stems.append(stem)
        Image.fromarray(arr.astype(np.uint8)).save(root / "JPEGImages" / f"{stem}.jpg", quality=92)
        ann = ET.Element("annotation")
        ET.SubElement(ann, "folder").text = "JPEGImages"
        ET.SubElement(ann, "filename").text = f"{stem}.jpg"
        size = ET.SubElement(ann, "size")
        for tag, v in (("width", w), ("height", h), ("depth", 3)):
            ET.SubElement(size, tag).text = str(v)
        for cls, x0, y0, x1, y1, difficult in objects:
            obj = ET.SubElement(ann, "object")
            ET.SubElement(obj, "name").text = cls
            ET.SubElement(obj, "difficult").text = str(difficult)
            box = ET.SubElement(obj, "bndbox")
            for tag, v in (("xmin", x0), ("ymin", y0), ("xmax", x1), ("ymax", y1)):
                ET.SubElement(box, tag).text = str(v)
        ET.ElementTree(ann).write(root / "Annotations" / f"{stem}.xml")
    (root / "ImageSets" / "Main" / "train.txt").write_text("".join(s + "\n" for s in stems[:-3]))
    (root / "ImageSets" / "Main" / "val.txt").write_text("".join(s + "\n" for s in stems[-3:]))
    return root


def voc_objects(year: Path) -> dict[str, dict]:
    """{file name: {"size": (w, h), "objects": [(class, xmin, ymin, xmax, ymax, difficult)]}} read
    straight from the XMLs (VOC's 1-based inclusive corners)."""
    out = {}
    for xml in sorted((year / "Annotations").glob("*.xml")):
        root = ET.parse(xml).getroot()
        objs = [(o.findtext("name"), *(int(o.find("bndbox").findtext(t)) for t in ("xmin", "ymin", "xmax", "ymax")),
                 int(o.findtext("difficult"))) for o in root.iter("object")]
        size = (int(root.find("size").findtext("width")), int(root.find("size").findtext("height")))
        out[root.findtext("filename")] = {"size": size, "objects": objs}
    return out


def labelimg_from_voc(year: Path, out: Path, beside: bool = False) -> Path:
    """labelImg's layout: one XML per image in a flat folder, the images in `images/` next to them (or,
    with `beside`, in the same folder), `<path>` naming where the image was on the annotator's machine."""
    images = out if beside else out / "images"
    images.mkdir(parents=True, exist_ok=True)
    for xml in sorted((year / "Annotations").glob("*.xml")):
        root = ET.parse(xml).getroot()
        name = root.findtext("filename")
        (images / name).write_bytes((year / "JPEGImages" / name).read_bytes())
        root.find("folder").text = "images"
        ET.SubElement(root, "path").text = f"C:\\Users\\someone\\Pictures\\{name}"
        ET.SubElement(root, "segmented").text = "0"
        ET.ElementTree(root).write(out / xml.name)
    return out


def csv_from_voc(year: Path, path: Path, headers: dict[str, str] | None = None) -> Path:
    """The TF OD API tutorials' CSV: one row per box, pixel corners (VOC's xmin - 1, xmax); difficult
    objects left out (the CSV has no column for them)."""
    names = {k: k for k in ("filename", "width", "height", "class", "xmin", "ymin", "xmax", "ymax")}
    names.update(headers or {})
    with open(path, "w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(names.values())
        for name, info in voc_objects(year).items():
            for cls, x0, y0, x1, y1, difficult in info["objects"]:
                if not difficult:
                    writer.writerow([name, *info["size"], cls, x0 - 1, y0 - 1, x1, y1])
    return path


# --- tf.train.Example wire format (tensorflow/core/example/{example,feature}.proto) ---

def bytes_feature(values: list[bytes]) -> bytes:  # Feature.bytes_list = 1; BytesList.value = 1
    return field(1, b"".join(field(1, v) for v in values))


def float_feature(values: list[float]) -> bytes:  # Feature.float_list = 2; FloatList.value = 1 [packed]
    return field(2, field(1, struct.pack(f"<{len(values)}f", *values)))


def int64_feature(values: list[int]) -> bytes:  # Feature.int64_list = 3; Int64List.value = 1 [packed]
    return field(3, field(1, b"".join(varint(v) for v in values)))


def example(features: dict[str, bytes]) -> bytes:
    """Example.features = 1 -> Features.feature = 1: map<string, Feature> as entries {key = 1, value = 2}."""
    entries = b"".join(field(1, field(1, k.encode()) + field(2, v)) for k, v in features.items())
    return field(1, entries)


def masked_crc32c(data: bytes) -> int:
    crc = crc32c.crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def frame(data: bytes) -> bytes:
    """One TFRecord record: length, masked CRC of the length, data, masked CRC of the data."""
    header = struct.pack("<Q", len(data))
    return header + struct.pack("<I", masked_crc32c(header)) + data + struct.pack("<I", masked_crc32c(data))


def tfrecord_from_voc(year: Path, path: Path, source_id_only: bool = False) -> Path:
    """The records a TF OD API create_*_tf_record.py script writes for the VOC folder: the encoded
    JPEG, normalised continuous corners ((xmin - 1) / width, xmax / width), class text and 1-based
    label, difficult flags."""
    records = []
    for name, info in voc_objects(year).items():
        w, h = info["size"]
        objs = info["objects"]
        feats = {
            "image/height": int64_feature([h]), "image/width": int64_feature([w]),
            "image/source_id": bytes_feature([name.encode()]),
            "image/encoded": bytes_feature([(year / "JPEGImages" / name).read_bytes()]),
            "image/format": bytes_feature([b"jpeg"]),
            "image/object/bbox/xmin": float_feature([(o[1] - 1) / w for o in objs]),
            "image/object/bbox/ymin": float_feature([(o[2] - 1) / h for o in objs]),
            "image/object/bbox/xmax": float_feature([o[3] / w for o in objs]),
            "image/object/bbox/ymax": float_feature([o[4] / h for o in objs]),
            "image/object/class/text": bytes_feature([o[0].encode() for o in objs]),
            "image/object/class/label": int64_feature([CLASSES.index(o[0]) + 1 for o in objs]),
            "image/object/difficult": int64_feature([o[5] for o in objs]),
        }
        if not source_id_only:
            feats["image/filename"] = bytes_feature([name.encode()])
        records.append(frame(example(feats)))
    path.write_bytes(b"".join(records))
    return path


def tfrecord_from_coco(doc: dict, images: Path, path: Path) -> Path:
    """The records of a COCO dataset (crowd regions left out), as create_coco_tf_record.py writes them."""
    names = {c["id"]: c["name"] for c in doc["categories"]}
    by_image: dict[int, list[dict]] = {}
    for a in doc["annotations"]:
        if not a.get("iscrowd"):
            by_image.setdefault(a["image_id"], []).append(a)
    with open(path, "wb") as fh:
        for img in doc["images"]:
            w, h = img["width"], img["height"]
            anns = by_image.get(img["id"], [])
            fh.write(frame(example({
                "image/encoded": bytes_feature([(images / img["file_name"]).read_bytes()]),
                "image/filename": bytes_feature([img["file_name"].encode()]),
                "image/format": bytes_feature([b"jpeg"]), "image/width": int64_feature([w]),
                "image/height": int64_feature([h]),
                "image/object/bbox/xmin": float_feature([a["bbox"][0] / w for a in anns]),
                "image/object/bbox/ymin": float_feature([a["bbox"][1] / h for a in anns]),
                "image/object/bbox/xmax": float_feature([(a["bbox"][0] + a["bbox"][2]) / w for a in anns]),
                "image/object/bbox/ymax": float_feature([(a["bbox"][1] + a["bbox"][3]) / h for a in anns]),
                "image/object/class/text": bytes_feature([names[a["category_id"]].encode() for a in anns]),
                "image/object/class/label": int64_feature([a["category_id"] for a in anns]),
            })))
    return path
