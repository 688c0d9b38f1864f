"""Write the example photos: scikit-image's public-domain ``chelsea`` and ``coffee`` as JPEG.

Run from the repository root: ``python examples/make_examples.py`` (needs scikit-image).
"""

from pathlib import Path

from PIL import Image
from skimage import data

HERE = Path(__file__).resolve().parent
QUALITY = 90  # keeps each file under 100 KB

for name in ("chelsea", "coffee"):
    Image.fromarray(getattr(data, name)()).save(HERE / f"{name}.jpg", quality=QUALITY)
