# syntax=docker/dockerfile:1
# The captchatask images, one Dockerfile with a target per image. Build from the repository root:
#   docker build --target operator -t ghcr.io/captchatask/captchatask-operator:dev .
#   docker build --target sidecar  -t ghcr.io/captchatask/captchatask-sidecar:dev .
#   docker build --target emulator -t ghcr.io/captchatask/captchatask-emulator:dev .
#
#   operator  `captchatask operator` (kopf): the package with its `operator` extra.
#   sidecar   `captchatask sidecar` (aiohttp), also the standalone receiver: no kopf inside.
#   emulator  `captchatask emulator`: the CaptchaAI/2captcha-compatible provider emulator that the
#             end-to-end tests run as a pod. Same virtualenv as the sidecar.
#
# WHEELS chooses where the Python wheels come from:
#   index    (default) resolved from the package index during the build, pinned by constraints.txt;
#   context  taken from .wheelhouse/ in the build context: the build needs no network at all.
#            hack/build-images.sh makes the wheelhouse with `pip wheel` on the host and builds
#            with `--build-arg WHEELS=context --network none` (hermetic: every input is on the host
#            before the build starts). By hand:
#              pip wheel -c constraints.txt --wheel-dir .wheelhouse '.[operator]'
#              docker build --build-arg WHEELS=context --network none --target operator ...
#            (.wheelhouse/ must hold wheels for CPython 3.11 on the image's platform.)
# With podman or buildah pass --build-arg WHEELS=index explicitly for the default route: buildah
# 1.28 chooses the stages to build from the --build-arg values and ignores the ARG's default.
# Either way the runtime stages are the same: a virtualenv copied onto a slim Python, bytecode
# compiled at build time (works with a read-only root filesystem), an unprivileged user.
ARG PYTHON_VERSION=3.11
ARG WHEELS=index

FROM python:${PYTHON_VERSION}-slim-bookworm AS python

# Wheels from the package index: the project's own wheel and every pinned dependency. The pip of
# a fresh virtualenv (ensurepip) does it, so the base image needs no pip of its own.
FROM python AS wheels-index
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml constraints.txt README.md ./
COPY src/ src/
COPY operator/ operator/
COPY sidecar/ sidecar/
COPY charts/captchatask/crds/ charts/captchatask/crds/
RUN python -m venv /opt/wheel-builder \
 && /opt/wheel-builder/bin/pip wheel -c constraints.txt --wheel-dir /wheels '.[operator]'

# Wheels made beforehand on the host (the same `pip wheel` command), for builds without network.
FROM python AS wheels-context
COPY .wheelhouse/ /wheels/

FROM wheels-${WHEELS} AS wheels

# The two virtualenvs install only from /wheels, so both routes give the same packages. pip and
# setuptools leave afterwards: nothing runs them in a container (about 25 MB less).
FROM python AS venv-runtime
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY --from=wheels /wheels/ /wheels/
RUN python -m venv /opt/captchatask \
 && /opt/captchatask/bin/pip install --no-index --find-links /wheels captchatask \
 && /opt/captchatask/bin/pip uninstall --yes --quiet pip setuptools \
 && /opt/captchatask/bin/python -m compileall -q /opt/captchatask \
 && ! /opt/captchatask/bin/python -c "import kopf" 2>/dev/null

FROM python AS venv-operator
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY --from=wheels /wheels/ /wheels/
RUN python -m venv /opt/captchatask \
 && /opt/captchatask/bin/pip install --no-index --find-links /wheels 'captchatask[operator]' \
 && /opt/captchatask/bin/pip uninstall --yes --quiet pip setuptools \
 && /opt/captchatask/bin/python -m compileall -q /opt/captchatask

FROM python AS emulator
LABEL org.opencontainers.image.title="captchatask-emulator" \
      org.opencontainers.image.source="https://github.com/captchatask/captchatask" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PATH=/opt/captchatask/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
COPY --from=venv-runtime /opt/captchatask /opt/captchatask
# 65532: the conventional "nonroot" uid; the chart's securityContext uses the same numbers.
USER 65532:65532
EXPOSE 8089
ENTRYPOINT ["captchatask"]
# All interfaces: in a pod the emulator is reached through its Service.
CMD ["emulator", "--host", "0.0.0.0", "--port", "8089"]

FROM python AS sidecar
LABEL org.opencontainers.image.title="captchatask-sidecar" \
      org.opencontainers.image.source="https://github.com/captchatask/captchatask" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PATH=/opt/captchatask/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    CAPTCHATASK_SPOOL_DIR=/var/spool/captchatask
COPY --from=venv-runtime /opt/captchatask /opt/captchatask
# The spool directory exists and belongs to the runtime user even without a mounted volume.
RUN mkdir -p /var/spool/captchatask && chown 65532:65532 /var/spool/captchatask
USER 65532:65532
VOLUME ["/var/spool/captchatask"]
EXPOSE 8080 8081 9090
ENTRYPOINT ["captchatask"]
CMD ["sidecar"]

# Last, so a plain `docker build .` gives the operator.
FROM python AS operator
LABEL org.opencontainers.image.title="captchatask-operator" \
      org.opencontainers.image.source="https://github.com/captchatask/captchatask" \
      org.opencontainers.image.licenses="Apache-2.0"
# MALLOC_ARENA_MAX=2: glibc's per-thread arenas (8 x cores) fragment while kopf parses large
# watch and list responses; two arenas keep the RSS lower (BENCH-4). The chart sets it too.
ENV PATH=/opt/captchatask/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    MALLOC_ARENA_MAX=2
COPY --from=venv-operator /opt/captchatask /opt/captchatask
USER 65532:65532
EXPOSE 9090
ENTRYPOINT ["captchatask"]
CMD ["operator", "--all-namespaces", "--standalone"]
