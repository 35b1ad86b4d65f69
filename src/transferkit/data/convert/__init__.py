"""Annotation converters to COCO JSON (VOC, YOLO), each returning a CocoDataset with a summary."""
