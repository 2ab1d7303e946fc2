"""COCO-shaped synthetic annotations, for benchmarks and tests at COCO scale without COCO.

The statistics follow instances_train2017: the 80 COCO classes in their 12 supercategories, Zipf-like class
frequencies with "person" in about a third of the boxes, ~2.9 classes and ~7 boxes per image, box sizes that
shrink as images get busier (so the 5% area filter keeps a realistic minority of images), and a few crowd
regions. No pixels: only the annotation file.
"""

from __future__ import annotations

import numpy as np

COCO_CLASSES = {
    "person": ["person"],
    "vehicle": ["bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat"],
    "outdoor": ["traffic light", "fire hydrant", "stop sign", "parking meter", "bench"],
    "animal": ["bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe"],
    "accessory": ["backpack", "umbrella", "handbag", "tie", "suitcase"],
    "sports": ["frisbee", "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove",
               "skateboard", "surfboard", "tennis racket"],
    "kitchen": ["bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl"],
    "food": ["banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake"],
    "furniture": ["chair", "couch", "potted plant", "bed", "dining table", "toilet"],
    "electronic": ["tv", "laptop", "mouse", "remote", "keyboard", "cell phone"],
    "appliance": ["microwave", "oven", "toaster", "sink", "refrigerator"],
    "indoor": ["book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush"],
}


def synthetic_coco(n_images: int = 120_000, seed: int = 0) -> dict:
    """A COCO-format dict with the statistics of instances_train2017 (about 7 boxes per image)."""
    rng = np.random.default_rng(seed)
    categories = [
        {"id": i + 1, "name": name, "supercategory": group}
        for i, (group, name) in enumerate((g, n) for g, names in COCO_CLASSES.items() for n in names)
    ]
    n_classes = len(categories)
    weights = 1.0 / np.arange(1, n_classes + 1) ** 0.8
    weights[0] = 8.0  # person
    weights /= weights.sum()

    classes_per_image = np.minimum(1 + rng.geometric(0.5, n_images) - 1 + rng.integers(0, 2, n_images), 8)
    images, annotations = [], []
    widths = np.where(rng.random(n_images) < 0.7, 640, 480)
    heights = 1120 - widths
    for i in range(n_images):
        classes = rng.choice(n_classes, size=classes_per_image[i], replace=False, p=weights)
        instances = rng.geometric(0.35, size=len(classes))
        n_boxes = int(instances.sum())
        w, h = int(widths[i]), int(heights[i])
        images.append({"id": i + 1, "file_name": f"{i + 1:012d}.jpg", "width": w, "height": h})
        frac = np.minimum(0.95, 0.6 / n_boxes * np.exp(rng.normal(0.0, 1.2, n_boxes)))
        aspect = np.exp(rng.normal(0.0, 0.4, n_boxes))
        bw = np.minimum(w, np.sqrt(frac * w * h * aspect))
        bh = np.minimum(h, frac * w * h / bw)
        box = 0
        for c, n in zip(classes.tolist(), instances.tolist()):
            crowd_one = n >= 3 and rng.random() < 0.08
            for j in range(n):
                annotations.append({
                    "id": len(annotations) + 1, "image_id": i + 1, "category_id": c + 1,
                    "bbox": [0.0, 0.0, round(float(bw[box]), 2), round(float(bh[box]), 2)],
                    "area": round(float(bw[box] * bh[box]) * 0.7, 2),
                    "iscrowd": int(crowd_one and j == 0),
                })
                box += 1
    return {"images": images, "annotations": annotations, "categories": categories}
