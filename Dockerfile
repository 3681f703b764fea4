# One image for the API, the worker and the one-shot migration (the command picks the role).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    CONDENSER_DATA_DIR=/data
WORKDIR /srv/condenser

COPY requirements-dev.txt pyproject.toml README.md ./
RUN pip install --no-cache-dir -r requirements-dev.txt
COPY app ./app
COPY core ./core
COPY worker ./worker
COPY migrations ./migrations
RUN pip install --no-cache-dir . && useradd --create-home --uid 10001 condenser \
    && mkdir -p /data && chown condenser /data
USER condenser
VOLUME ["/data"]
EXPOSE 8000
# The API alone, with the project's logging (CONDENSER_LOG_FORMAT); workers run `condenser worker`.
CMD ["condenser", "serve", "--concurrency", "0", "--host", "0.0.0.0", "--port", "8000"]
