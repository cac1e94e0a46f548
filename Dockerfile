# Submission image: Python, torch, numpy, infer/, predict.sh and one set of weights.
# Build with ./build.sh (stages a minimal context, squashes, saves NAME.tar.gz); a plain
# `docker build .` from the repository root works too and takes weights/demo by default.
FROM python:3.13-slim-bookworm

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

WORKDIR /workspace

# The heavy layer first, so that code and weight changes rebuild in seconds. The requirements
# file is removed again; squashing drops it without a trace. REQUIREMENTS picks the torch build:
# requirements-image-cu12.txt (torch 2.8.0, CUDA 12.8: any NVIDIA driver >= 525; the default) or
# requirements-image.txt (torch 2.13.0, CUDA 13.0: driver >= 580). build.sh --cuda 12|13 sets it.
ARG REQUIREMENTS=requirements-image-cu12.txt
COPY ${REQUIREMENTS} /tmp/requirements-image.txt
RUN pip install --no-deps --no-input -r /tmp/requirements-image.txt \
    && rm -rf /tmp/requirements-image.txt /root/.cache

ARG WEIGHTS=weights/demo
COPY infer/ /workspace/infer/
COPY predict.sh /workspace/predict.sh
COPY ${WEIGHTS} /workspace/weights/

CMD ["/bin/bash", "-c", "sh predict.sh"]
