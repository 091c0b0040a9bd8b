"""NVIDIA Triton: one server per node in explicit model-control mode; Modelium writes each model's
repository entry and loads and unloads it through `tritonclient`. Inference speaks KServe v2.
An entry is named after the instance key, so a new version loaded beside the serving one during
an update is a Triton model of its own (`my-model@u2`), switched to by the gateway's route.

The server is the one at `triton.url`, or one this node agent starts from `triton.binary` ("auto":
the `tritonserver` of the nvidia-pytriton wheel, as scripts/setup.sh extracts it or as the installed
package holds it, else one on PATH). Entries:
- a dropped Triton entry (config.pbtxt + version folders): copied as it is, its name set to the
  model's name;
- an ONNX model: `1/model.onnx` for the onnxruntime backend, which completes the config itself;
- a transformers model: a generated python-backend model running a transformers pipeline, one
  TEXT (BYTES) input and one OUTPUT (BYTES, JSON per item) output.

The python backend's stub embeds an interpreter that ignores PYTHONPATH (an isolated config), so
python-backend models in Modelium's repository start with two lines that put this node's
site-packages on `sys.path` (the user's files are never changed; the copy is).
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import logging
import re
import shutil
import sys
import sysconfig
from pathlib import Path
from typing import Any

import httpx

from modelium.config import Triton as TritonConfig
from modelium.runtimes import TRITON
from modelium.runtimes.base import Progress, RuntimeStartError, RuntimeUnhealthy
from modelium.runtimes.managed import post_expecting
from modelium.runtimes.process import free_port, runtime_http
from modelium.runtimes.records import RuntimeRecords
from modelium.runtimes.shared_server import ServesManyModels, SharedServer, answers
from modelium.types import Endpoint, EndpointProtocol, LoadRequest, ModelFormat

log = logging.getLogger(__name__)

NAME = TRITON
_SERVER = "_tritonserver"
_PROLOGUE_MARK = "# -- added by Modelium: this node's packages for the python backend's isolated interpreter"


# How long `stop` waits for Triton to finish a model's in-flight inferences (Triton's own exit
# timeout is 30 s).
UNLOAD_TIMEOUT = 60.0
# The largest input tensor a smoke check sends (elements): beyond it, only the ready state.
SMOKE_MAX_ELEMENTS = 1 << 20
_TEXT_TYPES = frozenset({"BYTES"})


class TritonUnavailable(RuntimeStartError):
    """No Triton server can be reached or started."""


# Where scripts/setup.sh puts the server taken out of the nvidia-pytriton wheel.
EXTRACTED_SERVER = Path(sys.prefix) / "triton" / "pytriton" / "tritonserver"


def bundled_server() -> Path | None:
    """The tritonserver directory of the nvidia-pytriton wheel: as scripts/setup.sh extracts it,
    or as the installed package holds it."""
    roots = [EXTRACTED_SERVER]
    spec = importlib.util.find_spec("pytriton")
    if spec is not None and spec.origin is not None:
        roots.append(Path(spec.origin).parent / "tritonserver")
    return next((root for root in roots if (root / "bin" / "tritonserver").is_file()), None)


def find_binary(configured: str) -> Path | None:
    if configured != "auto":
        found = shutil.which(configured)
        return Path(found) if found else None
    bundled = bundled_server()
    if bundled is not None:
        return bundled / "bin" / "tritonserver"
    found = shutil.which("tritonserver")
    return Path(found) if found else None


def prepare_backends(binary: Path) -> Path | None:
    """The backends folder for a bundled server: its python backend plus the stub built for this
    Python version (the wheel ships one per version beside it)."""
    root = binary.parent.parent
    backends = root / "backends"
    stub = (
        root
        / "python_backend_stubs"
        / f"{sys.version_info.major}.{sys.version_info.minor}"
        / "triton_python_backend_stub"
    )
    if not backends.is_dir():
        return None
    if stub.is_file():
        placed = backends / "python" / "triton_python_backend_stub"
        if not placed.is_file():
            shutil.copy2(stub, placed)
    return backends


# Packages for the python backend's stub that must come before this environment's own: the stubs
# in the nvidia-pytriton wheel are built against numpy 1.x, whose C layout numpy 2 changed (inputs
# read wrong). scripts/setup.sh installs numpy<2 here.
BACKEND_PACKAGES = Path(sys.prefix) / "triton-python"


def _site_packages() -> list[str]:
    first = [str(BACKEND_PACKAGES)] if BACKEND_PACKAGES.is_dir() else []
    paths = [*first, sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    return list(dict.fromkeys(paths))


def prologue() -> str:
    return f"{_PROLOGUE_MARK}\nimport sys as _s; _s.path[:0] = [p for p in {_site_packages()!r} if p not in _s.path]\n"


# The Python-backend model for HuggingFace directories: a real module, linted and type-checked.
_PYTHON_MODEL = Path(__file__).with_name("triton_model.py")


def _python_config(name: str, model_dir: str, task: str, device: str) -> str:
    index = device.split(":", 1)[1] if device.startswith("cuda:") else None
    kind = f"kind: KIND_GPU, gpus: [{index}]" if index is not None else "kind: KIND_CPU"
    params = {"model_dir": model_dir, "task": str(task), "device_index": index if index is not None else "-1"}
    parameters = "\n".join(
        f"parameters {{ key: {json.dumps(k)} value: {{ string_value: {json.dumps(v)} }} }}" for k, v in params.items()
    )
    return f'''name: "{name}"
backend: "python"
max_batch_size: 0
input [ {{ name: "TEXT", data_type: TYPE_STRING, dims: [ -1 ] }} ]
output [ {{ name: "OUTPUT", data_type: TYPE_STRING, dims: [ -1 ] }} ]
instance_group [ {{ count: 1, {kind} }} ]
{parameters}
'''


def write_entry(repository: Path, request: LoadRequest, fmt: str) -> Path:
    """Write the model's entry into the server's repository (replacing an older one)."""
    entry = repository / request.model
    if entry.exists():
        shutil.rmtree(entry)
    source = Path(request.path)
    device = request.booking.device
    if fmt == ModelFormat.TRITON:
        shutil.copytree(source, entry, ignore=shutil.ignore_patterns("modelium.yaml"))
        config = entry / "config.pbtxt"
        text = config.read_text(encoding="utf-8")
        renamed = re.sub(r'(?m)^(\s*name\s*:\s*)"[^"]*"', rf'\1"{request.model}"', text, count=1)
        config.write_text(renamed if renamed != text else f'name: "{request.model}"\n{text}', encoding="utf-8")
        for model_py in entry.glob("*/model.py"):
            original = model_py.read_text(encoding="utf-8")
            if _PROLOGUE_MARK not in original:
                model_py.write_text(prologue() + original, encoding="utf-8")
    elif fmt == ModelFormat.ONNX:
        onnx = sorted(source.glob("*.onnx")) if source.is_dir() else [source]
        if not onnx:
            raise RuntimeStartError(f"no .onnx file in {source}", retryable=False)
        (entry / "1").mkdir(parents=True)
        shutil.copy2(onnx[0], entry / "1" / "model.onnx")
        # The onnxruntime backend completes inputs and outputs from the model itself.
        (entry / "config.pbtxt").write_text(f'name: "{request.model}"\nbackend: "onnxruntime"\nmax_batch_size: 0\n')
    else:
        (entry / "1").mkdir(parents=True)
        (entry / "1" / "model.py").write_text(prologue() + _PYTHON_MODEL.read_text(encoding="utf-8"))
        (entry / "config.pbtxt").write_text(_python_config(request.model, str(source.resolve()), request.task, device))
    return entry


class TritonRuntimeAdapter(ServesManyModels):
    """One Triton server for the node; each model is an entry in its repository."""

    name = NAME

    def __init__(
        self,
        node: str,
        state_dir: Path,
        log_dir: Path,
        config: TritonConfig,
        host: str = "127.0.0.1",
        advertise: str | None = None,
    ) -> None:
        records = RuntimeRecords(state_dir / "records")
        server = SharedServer(_SERVER, records, log_dir / "tritonserver.log", NAME, node, EndpointProtocol.KSERVE_V2)
        super().__init__(node, host, advertise, server)
        self._config = config
        self._repository = config.model_repository or state_dir / "repository"
        self._url: str | None = config.url.rstrip("/") if config.url else None

    # -- the server ----------------------------------------------------------------------------
    def _public_url(self) -> str:
        """The server's URL as gateways reach it: triton.url as given, or the started server's
        port on this node's advertised address."""
        if self._config.url or self._url is None or self._advertise == self._local:
            return self._url or ""
        return self._url.replace(f"//{self._local}:", f"//{self._advertise}:", 1)

    def _client(self) -> Any:
        import tritonclient.http.aio as triton_http

        assert self._url is not None
        return triton_http.InferenceServerClient(self._url.split("://", 1)[-1], conn_timeout=30.0)

    async def _live(self, url: str | None = None) -> bool:
        url = url or self._url
        return url is not None and await answers(f"{url}/v2/health/live", timeout=3.0)

    async def _ensure_server(self, progress: Progress) -> None:
        if self._url is not None and not self._server.exited() and await self._live():
            return
        if self._config.url:
            raise TritonUnavailable(f"the Triton server at triton.url {self._config.url} does not answer")
        binary = find_binary(self._config.binary)
        if binary is None:
            raise TritonUnavailable(
                "no tritonserver found (triton.binary: auto looks in the nvidia-pytriton wheel and on PATH); "
                "run scripts/setup.sh (it takes one out of the nvidia-pytriton wheel), or set triton.url to a "
                "running server",
                retryable=False,
            )
        self._repository.mkdir(parents=True, exist_ok=True)
        http_port = self._config.http_port or free_port(self._host)
        argv = [
            str(binary),
            f"--model-repository={self._repository}",
            "--model-control-mode=explicit",
            f"--http-address={self._host}",
            f"--http-port={http_port}",
            "--allow-grpc=false",
            "--allow-metrics=false",
            "--log-verbose=0",
        ]
        backends = prepare_backends(binary)
        if backends is not None:
            argv.append(f"--backend-directory={backends}")
        url = f"http://{self._local}:{http_port}"
        await self._server.start(argv, url, f"{url}/v2/health/live", self._config.start_timeout_seconds, progress)
        self._url = url

    # -- the adapter interface -----------------------------------------------------------------
    async def start(self, request: LoadRequest, progress: Progress) -> Endpoint:
        async with self._lock:
            await self._ensure_server(progress)
            served = await self._still_serving(request.model)
            if served is not None:
                return served
            write_entry(self._repository, request, request.format)
            client = self._client()
            logged = _size(self._server.log_path)
            try:
                progress(f"triton loads {request.model}")
                await client.load_model(request.model)
                if not await client.is_model_ready(request.model):
                    raise RuntimeStartError(f"Triton loaded {request.model} but it is not ready")
            except RuntimeStartError:
                raise
            except Exception as exc:  # tritonclient raises InferenceServerException with Triton's words
                # Its answer is often only "failed to poll from model repository": the reason is
                # in the server's log, on an error line that names the model.
                why = _logged_errors(self._server.log_path, logged, request.model)
                raise RuntimeStartError(
                    f"Triton could not load {request.model}: {_message(exc)}"
                    + (f" (tritonserver: {why})" if why else ""),
                    retryable=False,
                ) from None
            finally:
                await client.close()
            assert self._url is not None
            endpoint = Endpoint(self._public_url(), EndpointProtocol.KSERVE_V2, NAME, self._node, self._server.pid)
            self._endpoints[request.model] = endpoint
            return endpoint

    async def check_health(self, model: str) -> None:
        if model not in self._endpoints:
            raise RuntimeUnhealthy(f"{model} is not loaded in this node's Triton server")
        if self._server.exited():
            raise RuntimeUnhealthy(f"tritonserver (pid {self._server.pid}) exited")
        client = self._client()
        try:
            ready = await client.is_model_ready(model)
        except Exception as exc:
            raise RuntimeUnhealthy(f"Triton does not answer for {model}: {_message(exc)}") from None
        finally:
            await client.close()
        if not ready:
            raise RuntimeUnhealthy(f"Triton says {model} is not ready")

    async def smoke(self, endpoint: Endpoint, model: str) -> bool:
        """One inference when every input's shape is known from the model's metadata (zeros, or
        one short text for a text input of any length): it must answer outputs. False when an
        input's shape is open (the ready state, checked before, is all there is to go on)."""
        url = f"{self._url}/v2/models/{model}"
        try:
            async with runtime_http(30.0) as http:
                metadata, config = (await http.get(url)).json(), (await http.get(f"{url}/config")).json()
        except (httpx.HTTPError, ValueError) as exc:
            raise RuntimeUnhealthy(f"Triton does not describe {model}: {exc}") from None
        inputs = smoke_inputs(metadata, config)
        if inputs is None:
            return False
        response = await post_expecting(f"{url}/infer", {"inputs": inputs})
        try:
            outputs = response.json().get("outputs")
        except (ValueError, AttributeError):
            outputs = None
        if not outputs:
            raise RuntimeUnhealthy(f"{url}/infer answered 200 without outputs: {response.text[:200]}")
        return True

    async def in_flight(self, endpoint: Endpoint, model: str) -> int | None:
        """0: Triton finishes a model's in-flight inferences as it unloads it (the model is
        UNLOADING until they are answered; new requests are refused), and `stop` waits for that."""
        return 0

    async def stop(self, model: str) -> bool:
        async with self._lock:
            if self._endpoints.pop(model, None) is None:
                return False
            if await self._live():
                client = self._client()
                try:
                    await client.unload_model(model, unload_dependents=True)
                except Exception as exc:
                    log.warning("Triton could not unload %s: %s", model, _message(exc))
                finally:
                    await client.close()
                await self._unloaded(model)
            shutil.rmtree(self._repository / model, ignore_errors=True)
            return True

    async def _unloaded(self, model: str, timeout: float = UNLOAD_TIMEOUT) -> None:
        """Wait while Triton answers the model's in-flight inferences before it lets the model
        go (its unload call returns at once, the model UNLOADING until then), so that its memory
        is free before its booking is released."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            try:
                async with runtime_http(10.0) as http:
                    index = (await http.post(f"{self._url}/v2/repository/index", json={})).json()
            except (httpx.HTTPError, ValueError):
                return  # the server went: nothing of the model is left
            states = {item.get("state") for item in index if isinstance(item, dict) and item.get("name") == model}
            if "UNLOADING" not in states:
                return
            if loop.time() > deadline:
                log.warning("Triton still unloads %s after %gs; its entry is removed anyway", model, timeout)
                return
            await asyncio.sleep(0.2)

    async def stop_all(self) -> None:
        for model in list(self._endpoints):
            await self.stop(model)
        await self._server.stop()

    async def adopt(self) -> list[str]:
        """Take over a tritonserver an earlier node agent left running, and the models it serves
        from this node's repository."""
        if not await self._server.adopt(self._live):
            return []
        self._url = self._server.url
        adopted = []
        async with runtime_http(10.0) as http:
            index = (await http.post(f"{self._url}/v2/repository/index", json={"ready": True})).json()
        for item in index:
            name = item.get("name")
            if name and (self._repository / name).is_dir():
                self._endpoints[name] = Endpoint(
                    self._public_url(), EndpointProtocol.KSERVE_V2, NAME, self._node, self._server.pid
                )
                adopted.append(name)
        return adopted


def smoke_inputs(metadata: dict[str, Any], config: dict[str, Any]) -> list[dict[str, Any]] | None:
    """KServe v2 inputs for a smoke check from a model's metadata and config: zeros (or "Hello"
    for text) of each required input's shape, with a batch of one where the model batches.
    None when a shape is open (a dimension of -1 other than the batch), or too large to send."""
    optional = {i.get("name") for i in config.get("input") or [] if isinstance(i, dict) and i.get("optional")}
    batches = int(config.get("max_batch_size") or 0) > 0
    inputs = []
    for tensor in metadata.get("inputs") or []:
        name, datatype, shape = tensor.get("name"), tensor.get("datatype"), list(tensor.get("shape") or [])
        if name in optional:
            continue
        if batches and shape and shape[0] == -1:
            shape[0] = 1
        if datatype in _TEXT_TYPES and shape and shape[-1] == -1 and all(d > 0 for d in shape[:-1]):
            shape[-1] = 1  # a text input of any length (the generated python-backend entry's TEXT)
        if not shape or any(not isinstance(d, int) or d < 0 for d in shape):
            return None
        count = 1
        for dim in shape:
            count *= dim
        if count > SMOKE_MAX_ELEMENTS:
            return None
        value: Any = "Hello" if datatype in _TEXT_TYPES else (False if datatype == "BOOL" else 0)
        inputs.append({"name": name, "shape": shape, "datatype": datatype, "data": [value] * count})
    return inputs or None


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


# An error line of tritonserver's log: `E1201 23:18:51.216326 31583 file.cc:1460] "message"`.
_ERROR_LINE = re.compile(r'^E\d{4} [\d:.]+ +\d+ [^\]]+\] "?(?P<message>.*?)"?$')


def _logged_errors(path: Path, offset: int, model: str, limit: int = 2) -> str:
    """The last error lines the server logged after `offset` that name `model`, their messages
    only (the server's log is shared by every model it serves)."""
    try:
        with path.open("rb") as f:
            f.seek(offset)
            text = f.read(1 << 20).decode("utf-8", "replace")
    except OSError:
        return ""
    found = [m["message"] for line in text.splitlines() if model in line and (m := _ERROR_LINE.match(line))]
    return "; ".join(found[-limit:])


def _message(exc: Exception) -> str:
    message = getattr(exc, "message", None)
    return str(message() if callable(message) else message or exc)
