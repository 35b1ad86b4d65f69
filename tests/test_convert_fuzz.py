"""Property: whatever a broken annotation file holds, a converter either converts it or stops with one
line naming the file; it never raises anything else (no traceback for the user)."""

import copy
import json
import math
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from transferkit.data.coco import read_coco
from transferkit.data.convert import CONVERTERS
from transferkit.errors import TransferKitError

# FUZZ_EXAMPLES=5000 for a longer, random hunt (`make fuzz`); the suite runs the same 60 per converter every time.
SETTINGS = settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", "60")), deadline=None,
                    derandomize="FUZZ_EXAMPLES" not in os.environ, database=None,
                    suppress_health_check=[HealthCheck.too_slow])

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)

LABELME = {
    "version": "5.0.1", "flags": {}, "imagePath": "a.png", "imageData": None, "imageHeight": 30, "imageWidth": 40,
    "shapes": [
        {"label": "cat", "points": [[1, 1], [20, 2], [15, 25]], "group_id": None, "shape_type": "polygon",
         "flags": {}},
        {"label": "dog", "points": [[2, 2], [30, 20]], "group_id": 1, "shape_type": "rectangle", "flags": {}},
        {"label": "dog", "points": [[10, 10], [14, 10]], "group_id": 1, "shape_type": "circle", "flags": {}},
    ],
}
CITYSCAPES = {
    "imgHeight": 30, "imgWidth": 40,
    "objects": [{"label": "car", "polygon": [[1, 1], [20, 2], [15, 25]]},
                {"label": "cargroup", "polygon": [[0, 0], [39, 0], [39, 29]]},
                {"label": "road", "polygon": [[0, 0], [5, 0], [5, 5]]}],
}
COCO = {
    "images": [{"id": 1, "file_name": "a.png", "width": 40, "height": 30}],
    "categories": [{"id": 1, "name": "cat"}],
    "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 2, 10, 12], "iscrowd": 0}],
}
VOC_XML = """<annotation><filename>a.png</filename><size><width>40</width><height>30</height><depth>3</depth>
</size><object><name>cat</name><difficult>0</difficult><bndbox><xmin>2</xmin><ymin>3</ymin><xmax>20</xmax>
<ymax>25</ymax></bndbox><part><name>head</name><bndbox><xmin>2</xmin><ymin>3</ymin><xmax>5</xmax><ymax>6</ymax>
</bndbox></part></object></annotation>"""


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, prefix + (i,))


@st.composite
def mutated_json(draw, template):
    doc = copy.deepcopy(template)
    for _ in range(draw(st.integers(1, 3))):
        paths = [p for p in _paths(doc) if p]
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = doc
        for key in path[:-1]:
            parent = parent[key]
        if draw(st.booleans()):
            parent[path[-1]] = draw(JSON_VALUES)
        elif isinstance(parent, dict):
            del parent[path[-1]]
        else:
            parent.pop(path[-1])
    return doc


def _dump(doc) -> str:
    return json.dumps(doc, allow_nan=True)


@contextmanager
def _workdir() -> Iterator[Path]:
    """A folder with a 40x30 image, removed after the example (hypothesis runs many per test)."""
    with tempfile.TemporaryDirectory(prefix="tk-fuzz-") as name:
        d = Path(name)
        Image.new("RGB", (40, 30), (9, 9, 9)).save(d / "a.png")
        yield d


def _boxes_are_real(annotations, images, category_ids, slack: float) -> None:
    """Every box kept is finite, has an area, belongs to a known image and category, and lies inside
    its image (within `slack`: converters round to 3 decimals, the COCO reader allows half a pixel)."""
    sizes = {im["id"]: (im["width"], im["height"]) for im in images}
    for ann in annotations:
        x, y, w, h = ann["bbox"]
        assert all(isinstance(v, (int, float)) and math.isfinite(v) for v in (x, y, w, h)), ann
        assert w > 0 and h > 0, ann
        assert ann["image_id"] in sizes and ann["category_id"] in category_ids, ann
        width, height = sizes[ann["image_id"]]
        if width and height:  # a COCO file may leave the size out
            assert -slack <= x and -slack <= y and x + w <= width + slack and y + h <= height + slack, ann
        assert math.isfinite(ann["area"]) and ann["area"] >= 0, ann


def _converts_or_says_where(run, file: Path) -> None:
    """A converter either stops with one line naming the file, or gives only real boxes."""
    try:
        result = run()
    except TransferKitError as exc:
        message = str(exc)
        assert "\n" not in message and (str(file) in message or file.name in message), message
        return
    if hasattr(result, "skipped"):  # a converter's CocoDataset
        _boxes_are_real(result.annotations, result.images, range(1, len(result.categories) + 1), 1e-3)
    else:  # read_coco's CocoFile
        _boxes_are_real(result.annotations, result.images, {c["id"] for c in result.categories}, 0.5)


def _labelme_with(points, shape_type):
    doc = copy.deepcopy(LABELME)
    doc["shapes"][1].update(points=points, shape_type=shape_type)
    return doc


@SETTINGS
@given(mutated_json(LABELME))
@example(_labelme_with([[2, 2], [300, 200]], "rectangle"))  # reaches outside: clipped
@example(_labelme_with([[5, 5], [5, 20]], "rectangle"))  # no width: skipped
@example(_labelme_with([[50, 50], [60, 60]], "rectangle"))  # wholly outside: skipped
def test_labelme_mutations(doc):
    with _workdir() as d:
        (d / "a.json").write_text(_dump(doc))
        _converts_or_says_where(lambda: CONVERTERS["labelme"](d), d / "a.json")


@SETTINGS
@given(mutated_json(CITYSCAPES))
def test_cityscapes_mutations(doc):
    with _workdir() as d:
        frame = d / "gtFine" / "train" / "x"
        frame.mkdir(parents=True)
        (frame / "x_000000_000000_gtFine_polygons.json").write_text(_dump(doc))
        _converts_or_says_where(lambda: CONVERTERS["cityscapes"](d), frame / "x_000000_000000_gtFine_polygons.json")


@SETTINGS
@given(mutated_json(COCO))
def test_coco_mutations(doc):
    with _workdir() as d:
        (d / "a.json").write_text(_dump(doc))
        _converts_or_says_where(lambda: read_coco(d / "a.json"), d / "a.json")


@SETTINGS
@given(st.data())
def test_voc_mutations(data):
    text = VOC_XML
    for _ in range(data.draw(st.integers(1, 3))):
        start = data.draw(st.integers(0, len(text)))
        end = data.draw(st.integers(start, min(len(text), start + 12)))
        text = text[:start] + data.draw(st.sampled_from(["", "-", "1e9", "nan", "<", "&x;", "abc", "-5", "..", "/"])) \
            + text[end:]
    with _workdir() as d:
        (d / "Annotations").mkdir()
        (d / "JPEGImages").mkdir()
        (d / "a.png").rename(d / "JPEGImages" / "a.png")
        (d / "Annotations" / "a.xml").write_text(text)
        _converts_or_says_where(lambda: CONVERTERS["voc"](d), d / "Annotations" / "a.xml")


@SETTINGS
@given(st.lists(st.text(alphabet="0123456789 .-e\tnaif", max_size=30), max_size=4), st.sampled_from(
    ["names: [cat, dog]", "names: {0: cat, 1: dog}", "names: 3", "names: {x: cat}", ": :", "[1, 2]", ""]))
@example(["0 0.9 0.5 0.5 0.5", "1 0.5 0.5 0 0.2", "1 -2 0.5 0.5 0.5"], "names: [cat, dog]")
def test_yolo_mutations(lines, data_yaml):
    with _workdir() as d:
        (d / "images" / "train").mkdir(parents=True)
        (d / "labels" / "train").mkdir(parents=True)
        (d / "a.png").rename(d / "images" / "train" / "a.png")
        (d / "labels" / "train" / "a.txt").write_text("\n".join(lines))
        (d / "data.yaml").write_text(data_yaml)
        _converts_or_says_where(lambda: CONVERTERS["yolo"](d), d / "data.yaml")


def test_the_fuzz_leaves_no_folders_behind():
    before = set(Path(tempfile.gettempdir()).glob("tk-fuzz-*"))
    test_yolo_mutations()
    assert set(Path(tempfile.gettempdir()).glob("tk-fuzz-*")) == before


def _tf_example(png: bytes) -> bytes:
    from detection_fixtures import bytes_feature, example, float_feature, int64_feature

    return example({
        "image/encoded": bytes_feature([png]), "image/filename": bytes_feature([b"a.png"]),
        "image/width": int64_feature([40]), "image/height": int64_feature([30]),
        "image/object/bbox/xmin": float_feature([0.1, 0.5]), "image/object/bbox/ymin": float_feature([0.1, 0.2]),
        "image/object/bbox/xmax": float_feature([0.4, 0.9]), "image/object/bbox/ymax": float_feature([0.6, 0.8]),
        "image/object/class/text": bytes_feature([b"cat", b"dog"]), "image/object/class/label": int64_feature([1, 2]),
        "image/object/difficult": int64_feature([0, 1]),
    })


@SETTINGS
@given(st.data())
def test_tfrecord_mutations(data):
    """Bytes changed inside an Example (re-framed with good CRCs, so the parser sees them) or anywhere
    in the file (the framing sees them)."""
    from detection_fixtures import frame

    with _workdir() as d:
        payload = bytearray(_tf_example((d / "a.png").read_bytes()))
        reframe = data.draw(st.booleans())
        blob = payload if reframe else bytearray(frame(bytes(payload)) * 2)
        for _ in range(data.draw(st.integers(1, 4))):
            at = data.draw(st.integers(0, len(blob) - 1))
            blob[at] = data.draw(st.integers(0, 255))
        if data.draw(st.booleans()):
            blob = blob[:data.draw(st.integers(0, len(blob)))]
        (d / "a.tfrecord").write_bytes(frame(bytes(blob)) if reframe else bytes(blob))
        _converts_or_says_where(lambda: CONVERTERS["tfrecord"](d / "a.tfrecord", images=d / "out"),
                                d / "a.tfrecord")


@SETTINGS
@given(st.lists(st.text(alphabet="a.png,0123456789-e\"cat\n ", max_size=30), max_size=4))
def test_csv_mutations(lines):
    with _workdir() as d:
        (d / "a.csv").write_text("filename,width,height,class,xmin,ymin,xmax,ymax\na.png,40,30,cat,1,2,20,25\n"
                                 + "\n".join(lines))
        _converts_or_says_where(lambda: CONVERTERS["csv"](d / "a.csv", images=d), d / "a.csv")
