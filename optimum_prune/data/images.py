"""Real photographs paired with captions, for image-text calibration and evaluation without a hub.

The images are sample data that the scikit-image wheel ships in ``skimage/data`` (astronaut, camera,
coffee, ...; each one's source and license are in the docstrings of ``skimage.data``). They are
read straight from the installed files, so nothing is downloaded. The captions were written for
this package from looking at each image. Every image has two captions: the ``calibration`` split
uses the first, the ``evaluation`` split the second, so the two splits never share text.
"""

from __future__ import annotations

from importlib import resources
from typing import Any

from ..dependencies import MissingDependency

# file in skimage/data → (calibration caption, evaluation caption)
CAPTIONS: dict[str, tuple[str, str]] = {
    "astronaut.png": (
        "An astronaut in an orange flight suit holds her helmet in front of an American flag and a model of the space shuttle.",
        "Official portrait of a smiling woman astronaut wearing an orange launch suit with mission patches.",
    ),
    "brick.png": (
        "A grey wall of long rectangular bricks laid in rows.",
        "Black and white close-up of a brick pavement texture.",
    ),
    "camera.png": (
        "A man in a dark coat looks through a camera on a tripod in a grassy field.",
        "Black and white photograph of a cameraman with buildings in the distance.",
    ),
    "cell.png": (
        "A single bright round cell seen through a microscope on a grey background.",
        "Grayscale microscope image of one cell.",
    ),
    "chelsea.png": (
        "A tabby cat with green eyes looks straight at the camera.",
        "Close-up of the face of a striped orange and brown cat.",
    ),
    "clock_motion.png": (
        "A round wall clock blurred by motion against a grey wall.",
        "Blurry grayscale photograph of a clock.",
    ),
    "coffee.png": (
        "A cup of espresso with crema on a red saucer on a wooden table.",
        "A red coffee cup and a spoon on a wooden surface.",
    ),
    "coins.png": (
        "Rows of old coins on a dark background.",
        "Grayscale photograph of ancient coins arranged in four rows.",
    ),
    "grass.png": (
        "Dense grass seen from above in black and white.",
        "Texture of many thin blades of grass.",
    ),
    "gravel.png": (
        "A patch of small gravel stones.",
        "Grayscale texture of crushed rock.",
    ),
    "ihc.png": (
        "Tissue stained brown and blue for immunohistochemistry, seen under a microscope.",
        "Microscope slide of stained tissue with brown cell membranes.",
    ),
    "moon.png": (
        "The cratered surface of the Moon in grayscale.",
        "Close view of lunar terrain with a few craters.",
    ),
    "motorcycle_left.png": (
        "A red motorcycle parked in a garage with shelves behind it.",
        "A shiny red and chrome motorbike indoors.",
    ),
    "page.png": (
        "A scanned page of text titled Region-based segmentation.",
        "A printed page explaining how markers are chosen to segment an image.",
    ),
    "text.png": (
        "Handwritten notes and formulas on paper, photographed at an angle.",
        "Black and white photo of handwritten symbols on a page.",
    ),
    "hubble_deep_field.jpg": (
        "Hundreds of distant galaxies in the Hubble deep field.",
        "A dark sky full of colourful galaxies seen by a space telescope.",
    ),
    "retina.jpg": (
        "A photograph of the human retina showing the optic disc and blood vessels.",
        "Orange fundus image of the back of an eye.",
    ),
    "rocket.jpg": (
        "A rocket stands lit up on its launch pad at night between lightning towers.",
        "A launch pad at dusk with a white rocket and floodlights.",
    ),
}
SPLITS = ("calibration", "evaluation")


def image_text_pairs(split: str = "calibration") -> list[dict[str, Any]]:
    """``[{"image": PIL.Image (RGB), "text": caption}, ...]``, one pair per bundled photograph."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    try:
        from PIL import Image

        folder = resources.files("skimage") / "data"
    except ImportError as error:
        raise MissingDependency(f"the bundled image-text pairs need scikit-image ({error}): pip install 'optimum-prune[multimodal]'") from error
    pairs = []
    for name, captions in CAPTIONS.items():
        with Image.open(folder / name) as image:
            pairs.append({"image": image.convert("RGB"), "text": captions[SPLITS.index(split)]})
    return pairs
