# syntax=docker/dockerfile:1
# Multi-stage build of Featherweight.
#   builder     compiles the C kernels (cffi) once and installs the package into /opt/venv
#   builder-gpu the same venv with onnxruntime-gpu (CUDA and cuDNN from pip) instead of onnxruntime
#   api         uvicorn serving api.main:app on :8000
#   worker      a Celery worker; the queue comes from the command (`featherweight worker --queue cpu-x86`);
#               built for linux/arm64 it is the cpu-arm worker (the kernels compile with NEON there)
#   worker-gpu  the worker with ONNX Runtime's CUDA provider, for `--queue gpu`
# docker compose builds each target it needs; by hand: docker build --target api -t featherweight-api .

ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim-bookworm AS builder
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential \
 && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY kernels ./kernels
COPY core ./core
COPY api ./api
COPY worker ./worker
COPY featherweight ./featherweight
COPY migrations ./migrations
# the export formats' converters (pytorch, tflite); the API checks the same install at submit
ARG EXPORT_EXTRAS=torch,tflite
RUN pip install --upgrade pip setuptools wheel cffi \
 && pip install ".[${EXPORT_EXTRAS}]" \
 && python -c "import kernels, core, api.main, worker.celery_app, migrations"

FROM builder AS builder-gpu
RUN pip uninstall -y onnxruntime \
 && pip install "onnxruntime-gpu[cuda,cudnn]>=1.23"

FROM python:${PYTHON_VERSION}-slim-bookworm AS runtime
RUN apt-get update \
 && apt-get install -y --no-install-recommends libgomp1 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --create-home --uid 10001 featherweight \
 && mkdir -p /data && chown featherweight /data
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 FEATHERWEIGHT_HOME=/data
WORKDIR /home/featherweight
USER featherweight

FROM runtime AS api
COPY --from=builder /opt/venv /opt/venv
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=5s --retries=5 \
  CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health').status != 200)"
CMD ["uvicorn", "api.main:app", "--host", "0.0.0.0", "--port", "8000", "--proxy-headers"]

FROM runtime AS worker
COPY --from=builder /opt/venv /opt/venv
CMD ["featherweight", "worker", "--queue", "cpu-x86"]

FROM runtime AS worker-gpu
COPY --from=builder-gpu /opt/venv /opt/venv
CMD ["featherweight", "worker", "--queue", "gpu"]
