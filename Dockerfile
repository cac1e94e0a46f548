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
# file is removed again; squashing drops it without a trace.
COPY requirements-image.txt /tmp/requirements-image.txt
RUN pip install --no-deps --no-input -r /tmp/requirements-image.txt \
    && rm -rf /tmp/requirements-image.txt /root/.cache

ARG WEIGHTS=weights/demo
COPY infer/ /workspace/infer/
COPY predict.sh /workspace/predict.sh
COPY ${WEIGHTS} /workspace/weights/

CMD ["/bin/bash", "-c", "sh predict.sh"]
