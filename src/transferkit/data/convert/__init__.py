"""Annotation converters to COCO JSON (VOC, YOLO, labelme, Cityscapes, CSV boxes, TFRecords), each returning
a CocoDataset with a summary, and COCO to YOLO."""

from transferkit.data.convert.cityscapes import convert_cityscapes
from transferkit.data.convert.csv_boxes import convert_csv
from transferkit.data.convert.labelme import convert_labelme
from transferkit.data.convert.tfrecord import convert_tfrecord
from transferkit.data.convert.voc import convert_voc
from transferkit.data.convert.yolo import convert_yolo

# format -> converter(source, split, classes, **options)
CONVERTERS = {
    "voc": lambda src, split=None, classes=None, **kw: convert_voc(src, split, classes, **kw),
    "yolo": lambda src, split=None, classes=None: convert_yolo(src, split, classes),
    "labelme": lambda src, split=None, classes=None: convert_labelme(src, classes),
    "cityscapes": lambda src, split=None, classes=None: convert_cityscapes(src, split, classes),
    "csv": lambda src, split=None, classes=None, images=None, columns=None: convert_csv(src, images, classes,
                                                                                         columns),
    "tfrecord": lambda src, split=None, classes=None, images=None, keep_difficult=False, label_map=None:
        convert_tfrecord(src if isinstance(src, (list, tuple)) else [src], images, classes, keep_difficult, label_map),
}
