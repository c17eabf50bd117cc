"""NVIDIA Triton Inference Server as bench/sidebyside.py's anchor: where
scripts/install_triton.sh put it, and how to start it.

The server is the `tritonserver` binary of the nvidia-pytriton wheel, with the Python backend
the wheel ships; the install script gathers that backend and its stub for Python 3.11 into
`.venv-triton/triton-backends/python/`. Three things make it run outside NVIDIA's container:

- LD_LIBRARY_PATH holds the interpreter's own libpython folder, ahead of any other: the stub
  otherwise binds to a libpython that lacks symbols it was built against (`_recursion_count`);
  and the wheel's `nvidia_pytriton.libs`, which holds the server's own libraries.
- PATH starts with the venv's bin/: the stub embeds Python without reading PYTHONPATH, and finds
  its prefix from the `python3` on PATH, so this makes the venv (its numpy and onnxruntime) the
  stub's environment rather than whatever the base interpreter has installed.
- `--backend-directory` points at the gathered folder.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from bench.bench import REPO_ROOT, http_status

DEFAULT_VENV: Final = REPO_ROOT / ".venv-triton"
INSTALL_HINT: Final = "scripts/install_triton.sh installs it"
# Printed by the venv's own interpreter: where its pieces are, and the versions in the report.
_PROBE: Final = """
import importlib.metadata as md, json, sysconfig
def version(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None
print(json.dumps({
    "libdir": sysconfig.get_config_var("LIBDIR"),
    "site_packages": sysconfig.get_paths()["purelib"],
    "versions": {n: version(n) for n in ("nvidia-pytriton", "tritonclient", "onnxruntime", "numpy")},
}))
"""


class TritonMissing(RuntimeError):
    """The anchor is not installed, or only in part; the message says what is missing."""


@dataclass(frozen=True, slots=True)
class TritonInstall:
    venv: Path
    site_packages: Path
    python_libdir: Path
    versions: dict[str, str | None]

    @property
    def server(self) -> Path:
        return self.site_packages / "pytriton" / "tritonserver" / "bin" / "tritonserver"

    @property
    def backends(self) -> Path:
        return self.venv / "triton-backends"

    @property
    def perf_analyzer(self) -> Path:
        return self.venv / "bin" / "perf_analyzer"

    def server_env(self) -> dict[str, str]:
        """The variables tritonserver (and its Python stubs) need, over the inherited ones."""
        libs = [str(self.python_libdir), str(self.site_packages / "nvidia_pytriton.libs")]
        return {
            "LD_LIBRARY_PATH": os.pathsep.join(libs),
            "PATH": os.pathsep.join([str(self.venv / "bin"), os.environ.get("PATH", "")]),
        }

    def perf_analyzer_env(self) -> dict[str, str]:
        """perf_analyzer loads libcudart.so.12 even on the CPU; the cuda-runtime wheel has it."""
        return {
            **os.environ,
            "LD_LIBRARY_PATH": str(self.site_packages / "nvidia" / "cuda_runtime" / "lib"),
        }

    def server_missing(self) -> str | None:
        """Why tritonserver cannot start from this install, or None."""
        stub = self.backends / "python" / "triton_python_backend_stub"
        for path in (self.server, self.backends / "python" / "libtriton_python.so", stub):
            if not path.is_file():
                return f"{path} is missing ({INSTALL_HINT})"
        return None

    def perf_analyzer_missing(self) -> str | None:
        if not self.perf_analyzer.is_file():
            return f"{self.perf_analyzer} is missing ({INSTALL_HINT})"
        return None


def find_install(venv: Path = DEFAULT_VENV) -> TritonInstall:
    """The install in `venv`, asked of the venv's own interpreter; TritonMissing when there is none."""
    python = venv / "bin" / "python"
    if not python.is_file():
        raise TritonMissing(f"no {venv} ({INSTALL_HINT})")
    try:
        probe = subprocess.run(
            [str(python), "-c", _PROBE], check=True, capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise TritonMissing(f"{python} does not run: {exc}") from exc
    info = json.loads(probe.stdout)
    return TritonInstall(
        venv=venv,
        site_packages=Path(info["site_packages"]),
        python_libdir=Path(info["libdir"]),
        versions=info["versions"],
    )


@dataclass(frozen=True, slots=True)
class TritonPorts:
    http: int
    grpc: int
    metrics: int


def server_command(
    install: TritonInstall, repo: Path, ports: TritonPorts, extra: list[str] | None = None
) -> list[str]:
    """tritonserver serving `repo` over HTTP and gRPC (on loopback); `env` in front sets its
    variables, then execs it, so the process we hold (and signal) is tritonserver itself."""
    variables = [f"{key}={value}" for key, value in install.server_env().items()]
    return [
        "env", *variables,
        str(install.server),
        "--model-repository", str(repo),
        "--backend-directory", str(install.backends),
        "--http-address", "127.0.0.1",
        "--http-port", str(ports.http),
        "--allow-grpc", "true",
        "--grpc-address", "127.0.0.1",
        "--grpc-port", str(ports.grpc),
        "--metrics-port", str(ports.metrics),
        *(extra or []),
    ]  # fmt: skip


def server_metadata(base_url: str) -> dict[str, object]:
    """GET /v2 of a KServe v2 server: its name, version and extensions ({} when it fails)."""
    status, body = http_status(f"{base_url}/v2")
    if status != 200:
        return {}
    try:
        metadata = json.loads(body)
    except ValueError:
        return {}
    return metadata if isinstance(metadata, dict) else {}
