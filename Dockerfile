# sae-dictionaries on a CUDA-capable PyTorch image. Unbuilt on the development machines (no
# Docker engine there); linted by hadolint in `make test`.
#   docker build -t sae-dictionaries .
#   docker run --gpus all -v "$PWD/runs:/work" sae-dictionaries info /work/my_dictionary
# torch comes from the base image (CUDA build); transformer-lens 4 needs torch >= 2.6.
FROM pytorch/pytorch:2.7.1-cuda12.8-cudnn9-runtime

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HF_HOME=/cache/huggingface

WORKDIR /app

# Dependency layer, cached until pyproject.toml changes: install the dependencies against
# empty package stubs, then drop the stub install so only the dependencies remain.
COPY pyproject.toml README.md ./
RUN for pkg in sae activations training server; do \
        mkdir -p "$pkg" && touch "$pkg/__init__.py"; \
    done \
    && pip install --no-cache-dir . \
    && pip uninstall -y sae-dictionaries \
    && rm -rf sae activations training server build ./*.egg-info

# Source layer: cheap to rebuild, no dependency resolution.
COPY sae ./sae
COPY activations ./activations
COPY training ./training
COPY server ./server
RUN pip install --no-cache-dir --no-deps . \
    && useradd --create-home --uid 10001 sae \
    && mkdir -p /cache/huggingface /work \
    && chown -R sae /cache /work

USER 10001
WORKDIR /work
EXPOSE 8000
ENTRYPOINT ["sae"]
CMD ["--help"]
