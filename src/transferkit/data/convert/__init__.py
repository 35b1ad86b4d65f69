"""Annotation converters to COCO JSON (VOC, YOLO, labelme, Cityscapes), each returning a CocoDataset with a
summary, and COCO to YOLO."""

from transferkit.data.convert.cityscapes import convert_cityscapes
from transferkit.data.convert.labelme import convert_labelme
from transferkit.data.convert.voc import convert_voc
from transferkit.data.convert.yolo import convert_yolo

# format -> converter(source, split, classes)
CONVERTERS = {
    "voc": lambda src, split=None, classes=None, **kw: convert_voc(src, split, classes, **kw),
    "yolo": lambda src, split=None, classes=None: convert_yolo(src, split, classes),
    "labelme": lambda src, split=None, classes=None: convert_labelme(src, classes),
    "cityscapes": lambda src, split=None, classes=None: convert_cityscapes(src, split, classes),
}
