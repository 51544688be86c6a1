# syntax=docker/dockerfile:1
# The cvae-search image: study creation, GPU workers and the dashboard all run from it, so
# every process that touches the study storage carries the same Optuna (its database schema
# is versioned) and the same training code.
#
#   docker build -f docker/worker.Dockerfile -t cvae-search .
#   docker run --rm --gpus all -e OPTUNA_STORAGE=postgresql+psycopg2://... cvae-search worker STUDY
FROM pytorch/pytorch:2.7.1-cuda12.8-cudnn9-runtime

LABEL org.opencontainers.image.title="cvae-search" \
      org.opencontainers.image.description="Multi-objective hyperparameter search for a free-bits conditional VAE" \
      org.opencontainers.image.licenses="MIT"

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    CVAE_SEARCH_ARTIFACTS=/artifacts \
    CVAE_SEARCH_CACHE=/cache

WORKDIR /app

# Dependencies in their own layer, read from pyproject.toml alone, so editing the code does
# not reinstall them. The constraint holds torch at the base image's CUDA build: pip fails
# rather than swap in another multi-GB torch.
COPY pyproject.toml ./
RUN python -c "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies'], sep='\n')" \
        > /tmp/requirements.txt \
    && python -c "import torch; print(f'torch=={torch.__version__}')" > /tmp/constraints.txt \
    && pip install --no-cache-dir -r /tmp/requirements.txt -c /tmp/constraints.txt \
    && rm /tmp/requirements.txt /tmp/constraints.txt

# The artifact and cache folders exist owned by the runtime user, so the named volumes that
# compose mounts there start out writable by it.
RUN useradd --create-home --uid 1000 --user-group --shell /bin/bash cvae \
    && mkdir -p /artifacts /cache /data \
    && chown 1000:1000 /artifacts /cache

COPY model/ model/
COPY search/ search/
RUN pip install --no-cache-dir --no-deps .
COPY studies/ studies/
COPY configs/ configs/

# Numeric, so a runtime can check it is not root without reading /etc/passwd.
USER 1000:1000

# Liveness of a worker is its trial heartbeat in the database, which the other workers act
# on; the dashboard's health check lives in docker-compose.yml.
ENTRYPOINT ["cvae-search"]
CMD ["worker", "--help"]
