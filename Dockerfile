# CPU image by default. For CUDA: --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128
# The install runs scripts/setup.sh, the same step CI runs (.ci/run -> scripts/test.sh).
FROM python:3.11-slim
ARG TORCH_INDEX=""
WORKDIR /app
# A C++ compiler for the fused 4-bit CPU kernel (scripts/setup.sh builds it once).
RUN apt-get update && apt-get install -y --no-install-recommends g++ && rm -rf /var/lib/apt/lists/*
COPY . /app
RUN useradd --create-home --uid 10001 loramux && chown -R loramux /app
USER loramux
RUN if [ -n "$TORCH_INDEX" ]; then \
      python -m venv .venv && .venv/bin/pip install -q "torch==2.13.0" --index-url "$TORCH_INDEX"; \
    fi && scripts/setup.sh && .venv/bin/loramux build-model
# gRPC on 50051, the OpenAI-compatible HTTP routes on 8000 (LORAMUX_HTTP_PORT=0: off), metrics on 9090.
ENV LORAMUX_HOST=0.0.0.0 LORAMUX_ADAPTER_DIR=/app/adapters LORAMUX_HTTP_PORT=8000
EXPOSE 50051 8000 9090
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s CMD [".venv/bin/loramux", "health"]
CMD ["scripts/serve.sh"]
