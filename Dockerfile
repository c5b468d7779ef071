# The GPU worker's image: CUDA's runtime, this project installed, a non-root user, the DVC workspace as
# a volume. The gpu pool's Kubernetes job (deployments/gpu-kubernetes-job-template.json) runs it with
# the workspace claim mounted at /workspace, as this user (runAsUser and fsGroup 10001); docs/operators.md
# walks the scale-out. Build from the project root:
#   docker build -t registry.example/scoft-flows:$(git rev-parse --short HEAD) .
# torch's wheels bring their own CUDA libraries; the CUDA runtime base brings what the NVIDIA container
# toolkit expects of an image (the driver's libraries are mounted from the node).
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DO_NOT_TRACK=1 \
    GX_ANALYTICS_ENABLED=false \
    PREFECT_SERVER_ANALYTICS_ENABLED=false

# git: DVC works in the workspace, a git checkout of this repository
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv git ca-certificates \
    && rm -rf /var/lib/apt/lists/*

RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# The dependencies change less often than the code: installed from pyproject.toml alone first, so a
# code change rebuilds only the last layers.
COPY pyproject.toml README.md /opt/scoft-flows/
RUN python3 -c "import tomllib; print('\n'.join(tomllib.load(open('/opt/scoft-flows/pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt && rm /tmp/requirements.txt
COPY scoft /opt/scoft-flows/scoft
COPY tasks /opt/scoft-flows/tasks
COPY flows /opt/scoft-flows/flows
RUN pip install --no-deps /opt/scoft-flows

# A numeric user, so that Kubernetes can check runAsNonRoot against it (uid 1000 is the base's "ubuntu").
RUN useradd --create-home --uid 10001 --user-group scoft \
    && mkdir /workspace && chown scoft:scoft /workspace
USER 10001

# The workspace: a checkout of this repository with its DVC cache and data, on a volume that outlives
# the pod, so a new run recomputes only what changed. Downloaded weights are cached there too.
ENV SCOFT_WORKSPACE=/workspace \
    HF_HOME=/workspace/.cache/huggingface
VOLUME ["/workspace"]
WORKDIR /workspace
