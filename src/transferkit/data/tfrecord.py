"""TFRecord files of `tf.train.Example`s, as the TF Object Detection API writes them, read without TensorFlow.

A TFRecord file is a run of records, each framed as TensorFlow's record_writer.cc writes it:
a uint64 length (little-endian), the masked CRC-32C of those 8 bytes, the data, the masked CRC-32C
of the data. The framing is read here by hand because it is those four fields and nothing else
(the CRC itself comes from the `crc32c` package); every length is checked against the bytes left
in the file, and against MAX_RECORD_BYTES, before anything is allocated, and a damaged record is
named by its index. The data of each record is a `tf.train.Example` protocol buffer, parsed by
protobuf with message classes built in code from tensorflow/core/example/{example,feature}.proto
through the descriptor API (no generated code, no protoc, no TensorFlow).

Training reads the files directly: the records are scanned once for their boxes and byte offsets
(as packed shards are indexed), and each image is read back by offset, its CRC checked again.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, text_format
from google.protobuf.message import DecodeError

from transferkit.checksums import masked_crc32c
from transferkit.data.images import BadImage, load_rgb
from transferkit.errors import TransferKitError

# One record holds one encoded image and its boxes: far below this. A larger declared length is damage.
MAX_RECORD_BYTES = 1 << 30


@lru_cache(maxsize=1)
def example_class():
    """The `tensorflow.Example` message class, built from its .proto definition with the descriptor API."""
    F = descriptor_pb2.FieldDescriptorProto  # noqa: N806 - protobuf's own name
    fdp = descriptor_pb2.FileDescriptorProto(name="transferkit/tensorflow_example.proto", package="tensorflow",
                                             syntax="proto3")

    def message(name: str, *fields: tuple[str, int, int, int, str | None]):
        msg = fdp.message_type.add(name=name)
        for fname, number, ftype, label, type_name in fields:
            f = msg.field.add(name=fname, number=number, type=ftype, label=label)
            if type_name:
                f.type_name = type_name
        return msg

    rep, opt = F.LABEL_REPEATED, F.LABEL_OPTIONAL
    message("BytesList", ("value", 1, F.TYPE_BYTES, rep, None))
    message("FloatList", ("value", 1, F.TYPE_FLOAT, rep, None)).field[0].options.packed = True
    message("Int64List", ("value", 1, F.TYPE_INT64, rep, None)).field[0].options.packed = True
    feature = message("Feature", ("bytes_list", 1, F.TYPE_MESSAGE, opt, ".tensorflow.BytesList"),
                      ("float_list", 2, F.TYPE_MESSAGE, opt, ".tensorflow.FloatList"),
                      ("int64_list", 3, F.TYPE_MESSAGE, opt, ".tensorflow.Int64List"))
    feature.oneof_decl.add(name="kind")
    for f in feature.field:
        f.oneof_index = 0
    features = message("Features", ("feature", 1, F.TYPE_MESSAGE, rep, ".tensorflow.Features.FeatureEntry"))
    entry = features.nested_type.add(name="FeatureEntry")
    entry.options.map_entry = True
    entry.field.add(name="key", number=1, type=F.TYPE_STRING, label=opt)
    entry.field.add(name="value", number=2, type=F.TYPE_MESSAGE, label=opt, type_name=".tensorflow.Feature")
    message("Example", ("features", 1, F.TYPE_MESSAGE, opt, ".tensorflow.Features"))
    pool = descriptor_pool.DescriptorPool()  # its own pool: no clash with TensorFlow's, if installed
    pool.Add(fdp)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("tensorflow.Example"))


@lru_cache(maxsize=1)
def label_map_class():
    """object_detection.protos.StringIntLabelMap (the TF OD API's label_map.pbtxt), built like Example; its
    other item fields (keypoints, frequency, ...) are skipped when read."""
    F = descriptor_pb2.FieldDescriptorProto  # noqa: N806 - protobuf's own name
    fdp = descriptor_pb2.FileDescriptorProto(name="transferkit/string_int_label_map.proto",
                                             package="object_detection.protos", syntax="proto2")
    item = fdp.message_type.add(name="StringIntLabelMapItem")
    item.field.add(name="name", number=1, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
    item.field.add(name="id", number=2, type=F.TYPE_INT32, label=F.LABEL_OPTIONAL)
    item.field.add(name="display_name", number=3, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
    fdp.message_type.add(name="StringIntLabelMap").field.add(
        name="item", number=1, type=F.TYPE_MESSAGE, label=F.LABEL_REPEATED,
        type_name=".object_detection.protos.StringIntLabelMapItem")
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("object_detection.protos.StringIntLabelMap"))


MAX_LABEL_MAP_BYTES = 16 << 20  # a label map names classes: a few KB; more is not one


def read_label_map(path: str | Path) -> dict[int, str]:
    """A label_map.pbtxt as {id: name} (the `name` records carry as class/text, else `display_name`)."""
    path = Path(path)
    try:
        if path.stat().st_size > MAX_LABEL_MAP_BYTES:
            raise TransferKitError(f"{path}: {path.stat().st_size} bytes is too large for a label map")
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TransferKitError(f"cannot read label map {path}: {exc}") from None
    label_map = label_map_class()()
    try:
        text_format.Parse(text, label_map, allow_unknown_field=True)
    except text_format.ParseError as exc:
        raise TransferKitError(f"{path}: not a TF OD API label map ({exc})") from None
    out: dict[int, str] = {}
    for item in label_map.item:
        name = item.name or item.display_name
        if item.id <= 0 or not name:
            raise TransferKitError(f"{path}: every item needs an id from 1 and a name (item {name!r} id {item.id})")
        if out.setdefault(item.id, name) != name:
            raise TransferKitError(f"{path}: id {item.id} is both {out[item.id]!r} and {name!r}")
    if not out:
        raise TransferKitError(f"{path}: the label map has no items")
    return out


def parse_example(data: bytes) -> dict[str, list]:
    """A serialised tf.train.Example as {key: list of bytes, floats or ints}."""
    example = example_class()()
    example.ParseFromString(data)
    out = {}
    for key, feature in example.features.feature.items():
        kind = feature.WhichOneof("kind")
        out[key] = list(getattr(feature, kind).value) if kind else []
    return out


@dataclass(frozen=True)
class RecordSample:
    """Where one record's bytes are: a TFRecord file, the offset of its data, its length."""

    file: Path
    offset: int
    length: int
    index: int
    key: str  # the image's file name

    def __str__(self) -> str:  # how a bad sample is named in messages
        return f"{self.file} record {self.index}"


def scan_records(path: Path):
    """(record index, data offset, data bytes) for every record, every CRC checked; a damaged or
    truncated record stops with its index."""
    path = Path(path)
    try:
        size = path.stat().st_size
        fh = open(path, "rb")  # noqa: SIM115 - closed below, after the generator ends
    except OSError as exc:
        raise TransferKitError(f"cannot read TFRecord file {path}: {exc.strerror}") from None
    with fh:
        pos, n = 0, 0
        while pos < size:
            where = f"{path}: record {n} (byte {pos})"
            header = fh.read(12)
            if len(header) < 12:
                raise TransferKitError(f"{where}: the file ends inside the record's header; it is truncated, "
                                       "write it again")
            (length,) = struct.unpack("<Q", header[:8])
            if struct.unpack("<I", header[8:])[0] != masked_crc32c(header[:8]):
                raise TransferKitError(f"{where}: damaged length (CRC mismatch); the file is damaged from here on")
            if length > MAX_RECORD_BYTES or pos + 16 + length > size:
                raise TransferKitError(f"{where}: declares {length} bytes, but {size - pos - 16} are left in the "
                                       f"file (limit {MAX_RECORD_BYTES}); it is truncated or damaged")
            data = fh.read(length)
            footer = fh.read(4)
            if len(data) != length or len(footer) != 4:
                raise TransferKitError(f"{where}: the file ends inside the record; it is truncated")
            if struct.unpack("<I", footer)[0] != masked_crc32c(data):
                raise TransferKitError(f"{where}: damaged data (CRC mismatch); write the file again")
            yield n, pos + 12, data
            pos += 16 + length
            n += 1


def read_record(sample: RecordSample) -> bytes:
    """One record's data, read by offset (a handle per read: safe in forked DataLoader workers)."""
    with open(sample.file, "rb") as fh:
        fh.seek(sample.offset)
        data = fh.read(sample.length)
        footer = fh.read(4)
    if len(data) != sample.length or len(footer) != 4:
        raise BadImage("the TFRecord file ends early; was it changed since it was read?")
    if struct.unpack("<I", footer)[0] != masked_crc32c(data):
        raise BadImage("damaged record (CRC mismatch)")
    return data


def read_record_image(sample: RecordSample, draft: int | None = None):
    try:
        encoded = parse_example(read_record(sample)).get("image/encoded") or [b""]
    except DecodeError as exc:
        raise BadImage(f"not a tf.train.Example ({exc})") from None
    return load_rgb(io.BytesIO(encoded[0]), draft)


@dataclass
class DetectionExample:
    """The TF Object Detection API fields of one record (boxes normalised to 0..1, as stored)."""

    index: int
    filename: str
    source_id: str
    fmt: str
    width: int
    height: int
    boxes: list[tuple[float, float, float, float]]  # xmin, ymin, xmax, ymax
    texts: list[str]
    labels: list[int]
    difficult: list[int]
    masks: list = field(default_factory=list)  # PNG bytes per object, or one flat float list for all
    encoded: bytes = b""
    crowd: list[int] = field(default_factory=list)  # image/object/is_crowd, as create_coco_tf_record.py writes


def _text(values: list, key: str, where: str) -> str:
    if not values:
        return ""
    if not isinstance(values[0], bytes):
        raise TransferKitError(f"{where}: {key} must be a bytes_list (a string)")
    return values[0].decode("utf-8", errors="replace").strip()


def _ints(feats: dict, key: str, where: str) -> list[int]:
    values = feats.get(key, [])
    if values and not isinstance(values[0], int):
        raise TransferKitError(f"{where}: {key} must be an int64_list")
    return list(values)


def detection_example(feats: dict[str, list], index: int, where: str) -> DetectionExample:
    """The object-detection fields of a parsed Example; a malformed record stops with its index."""
    coords = []
    for k in ("xmin", "ymin", "xmax", "ymax"):
        values = feats.get(f"image/object/bbox/{k}", [])
        if values and not isinstance(values[0], float):
            raise TransferKitError(f"{where}: image/object/bbox/{k} must be a float_list (normalised 0..1)")
        coords.append(values)
    n = len(coords[0])
    if any(len(c) != n for c in coords):
        raise TransferKitError(f"{where}: image/object/bbox/{{xmin,ymin,xmax,ymax}} have different lengths "
                               f"({', '.join(str(len(c)) for c in coords)})")
    texts = [v.decode("utf-8", errors="replace").strip() for v in feats.get("image/object/class/text", [])
             if isinstance(v, bytes)]
    labels = _ints(feats, "image/object/class/label", where)
    difficult = _ints(feats, "image/object/difficult", where)
    crowd = _ints(feats, "image/object/is_crowd", where)
    for key, values in (("class/text", texts), ("class/label", labels), ("difficult", difficult),
                        ("is_crowd", crowd)):
        if values and len(values) != n:
            raise TransferKitError(f"{where}: image/object/{key} has {len(values)} values for {n} boxes")
    if not texts and not labels and n:
        raise TransferKitError(f"{where}: boxes without image/object/class/text or /label")
    encoded = feats.get("image/encoded", [])
    height, width = (_ints(feats, f"image/{k}", where) for k in ("height", "width"))
    return DetectionExample(
        index=index, filename=_text(feats.get("image/filename", []), "image/filename", where),
        source_id=_text(feats.get("image/source_id", []), "image/source_id", where),
        fmt=_text(feats.get("image/format", []), "image/format", where).lower(),
        width=width[0] if width else 0, height=height[0] if height else 0,
        boxes=list(zip(*coords, strict=True)), texts=texts, labels=labels, difficult=difficult,
        masks=list(feats.get("image/object/mask", [])), encoded=encoded[0] if encoded else b"", crowd=crowd)


def read_examples(files: list[Path]):
    """(file, DetectionExample, data offset, data length) for every record of every file, in order."""
    for path in files:
        for n, offset, data in scan_records(path):
            where = f"{path}: record {n}"
            try:
                feats = parse_example(data)
            except DecodeError as exc:
                raise TransferKitError(f"{where}: not a tf.train.Example ({exc}); is this a TFRecord of "
                                       "tf.train.Example records?") from None
            yield path, detection_example(feats, n, where), offset, len(data)
