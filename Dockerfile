# chargen's image: serves a model with gunicorn (the same command as `chargen serve`), and can
# train one (docker-compose.yml's `train` service). See README.md, "Run with Docker".
#
#   docker build -t chargen .
#   docker run --rm -p 127.0.0.1:8000:8000 chargen            # serves the shipped model
#
# The source tree is installed in place (pip install -e) because the shipped model
# (artifacts/default) and the corpus manifest (corpora/) are found relative to it, as in a checkout.
FROM python:3.11-slim

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
    && pip install -e . \
    && useradd --system --uid 10001 --user-group --create-home --home-dir /home/chargen chargen \
    && mkdir /models && chown chargen:chargen /models
COPY artifacts/default/ artifacts/default/

# Settings (all CHARGEN_* variables are in README.md's configuration table). Listen on every
# interface inside the container; which host address is published is the compose file's choice.
ENV CHARGEN_BIND=0.0.0.0:8000 \
    CHARGEN_ARTIFACT=/app/artifacts/default \
    TF_CPP_MIN_LOG_LEVEL=2 \
    KERAS_HOME=/tmp/keras \
    NUMBA_CACHE_DIR=/tmp/numba

USER chargen
WORKDIR /home/chargen
EXPOSE 8000
VOLUME ["/models"]

# /health answers 503 until every worker has loaded the model; slim images have no curl.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; port = os.environ.get('CHARGEN_BIND', '').rpartition(':')[2] or '8000'; urllib.request.urlopen(f'http://127.0.0.1:{port}/health', timeout=4)"]

# exactly what `chargen serve` execs (chargen/cli.py); bind, workers and the rest come from CHARGEN_*
CMD ["python", "-m", "gunicorn", "-c", "python:service.gunicorn_conf"]
