"""Image sources: COCO-format annotations (validated), class-per-folder and plain image folders, safe image loading.

Every suite reads real data through here, so a corrupt image or a COCO file with missing fields gets one
clear `InputError` naming the file and the field, whichever suite the user ran.
"""

from typing import TYPE_CHECKING

from stitchkit._lazy import lazy_exports

if TYPE_CHECKING:  # for type checkers and IDEs; at run time each name is imported on first use
    from stitchkit.data.coco import CocoAnnotation, CocoCategory, CocoImage, CocoIndex, load_coco
    from stitchkit.data.images import IMAGE_EXTENSIONS, ImageFolder, check_images, image_files, load_image, scan_image_folder

__all__ = [
    "IMAGE_EXTENSIONS",
    "CocoAnnotation",
    "CocoCategory",
    "CocoImage",
    "CocoIndex",
    "ImageFolder",
    "check_images",
    "image_files",
    "load_coco",
    "load_image",
    "scan_image_folder",
]

__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "coco": ["CocoAnnotation", "CocoCategory", "CocoImage", "CocoIndex", "load_coco"],
        "images": ["IMAGE_EXTENSIONS", "ImageFolder", "check_images", "image_files", "load_image", "scan_image_folder"],
    },
)
