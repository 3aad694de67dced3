# chargen's images, two targets of one file (README.md, "Run with Docker"):
#   api     serves a model: the base install (ONNX Runtime; no TensorFlow, no Keras), `chargen serve`
#   train   trains one (docker-compose.yml's `train` service): the same plus '.[train]'
#
#   docker build -t chargen .                          # the api image (the last target is the default)
#   docker run --rm -p 127.0.0.1:8000:8000 chargen     # serves the shipped model
#   docker build --target train -t chargen-train .
#
# The source tree is installed in place (pip install -e) because the shipped model
# (artifacts/default) and the corpus manifest (corpora/) are found relative to it, as in a checkout.
FROM python:3.11-slim AS base

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/chargen/bin:$PATH

WORKDIR /app
COPY pyproject.toml README.md ./
COPY chargen/ chargen/
COPY model/ model/
COPY service/ service/
COPY corpora/ corpora/
RUN python -m venv /opt/chargen \
    && useradd --system --uid 10001 --user-group --create-home --home-dir /home/chargen chargen \
    && mkdir /models && chown chargen:chargen /models


# ---------------------------------------------------------------- train: Keras and TensorFlow
FROM base AS train

RUN pip install -e '.[train]'

USER chargen
WORKDIR /models
VOLUME ["/models"]
CMD ["chargen", "--help"]


# ---------------------------------------------------------------- api: the serving install only
FROM base AS api

RUN pip install -e .
COPY artifacts/default/ artifacts/default/

# Settings (all CHARGEN_* variables are in README.md's configuration table). Listen on every
# interface inside the container; which host address is published is the compose file's choice.
ENV CHARGEN_BIND=0.0.0.0:8000 \
    CHARGEN_ARTIFACT=/app/artifacts/default

USER chargen
WORKDIR /home/chargen
EXPOSE 8000
VOLUME ["/models"]

# /health answers 503 until every worker has loaded the model; slim images have no curl.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; port = os.environ.get('CHARGEN_BIND', '').rpartition(':')[2] or '8000'; urllib.request.urlopen(f'http://127.0.0.1:{port}/health', timeout=4)"]

# checks the artifact and the address, then becomes gunicorn (bind, workers and the rest from CHARGEN_*)
CMD ["chargen", "serve"]
