# The explorer in a container: `docker build -t sae-explorer . && docker run -p 7860:7860 sae-explorer`.
# The demo bundle is built while the image is built, so the container serves at once. The steps are the
# README's commands (make setup; python -m precompute demo ...; python -m app).
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    GRADIO_ANALYTICS_ENABLED=False HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 \
    SAE_APP_BUNDLE=/home/app/sae/runs/demo_bundle SAE_APP_PRESET=demo \
    SAE_APP_HOST=0.0.0.0 SAE_APP_PORT=7860 \
    SAE_APP_DEVICE=auto SAE_APP_PRECISION=auto SAE_APP_LOAD_4BIT=0 SAE_APP_LLAVA="" \
    SAE_APP_CACHE=/tmp/sae_app SAE_APP_CACHE_HOURS=24 SAE_APP_CACHE_GB=10 SAE_APP_SESSIONS=500 \
    SAE_APP_MAX_UPLOAD_MB=10 SAE_APP_MAX_UPLOAD_MEGAPIXELS=16.777216

RUN apt-get update && apt-get install -y --no-install-recommends make \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 1000 app

USER app
WORKDIR /home/app/sae

# Dependencies first (their layer is reused while only the code changes).
COPY --chown=app:app requirements.txt Makefile ./
RUN make setup

COPY --chown=app:app . .
RUN .venv/bin/python -m precompute demo --out runs/demo_bundle --preset demo

EXPOSE 7860
CMD [".venv/bin/python", "-m", "app"]
