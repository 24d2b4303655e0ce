# The neps-redis command with the demo's dependencies, for docker-compose.yml.
FROM python:3.12-slim
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
COPY lua ./lua
RUN pip install --no-cache-dir ".[demo]"
WORKDIR /work
