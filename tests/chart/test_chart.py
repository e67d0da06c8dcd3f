"""The Helm chart, rendered by a real helm and checked by kubernetes-validate against the
Kubernetes schemas (offline, strict), then read as data: secrets come from Secrets, probes
target the health port, the token API is behind no Service, pods are hardened, and the
multi-node rule fails the render. Also the Dockerfile, through hadolint."""

import os
import pathlib
import shutil
import subprocess

import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "auth-sidecar"
HELM = os.environ.get("HELM_BIN", str(ROOT / "node_modules" / ".bin" / "helm"))
VARIANTS = sorted((CHART / "ci").glob("*-values.yaml"))
SECRET_SETTINGS = {"AUTH_JWT_SECRET", "DATABASE_URL", "REDIS_URL"}
API_PORT = 50051


def helm(*args, check=True):
    assert pathlib.Path(HELM).exists(), f"helm not found at {HELM}: run scripts/test"
    return subprocess.run([HELM, *args], capture_output=True, text=True, check=check)


def render(*args, chart=CHART):
    out = helm("template", "rel", str(chart), *args).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def kinds(docs, kind):
    return [d for d in docs if d["kind"] == kind]


def pod_specs(docs):
    return [d["spec"]["template"]["spec"] for d in kinds(docs, "Deployment")]


def sidecar(spec):
    [container] = [c for c in spec["containers"] if c["name"] == "auth-sidecar"]
    return container


def validate(tmp_path, docs_text, name):
    path = tmp_path / f"{name}.yaml"
    path.write_text(docs_text)
    result = subprocess.run(
        [shutil.which("kubernetes-validate") or "kubernetes-validate", "--strict", "--quiet",
         str(path)],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_helm_lint_and_strict_lint():
    for args in (["lint", str(CHART)], ["lint", "--strict", str(CHART)]):
        result = helm(*args, check=False)
        assert result.returncode == 0, result.stdout + result.stderr
    for variant in VARIANTS:
        result = helm("lint", "--strict", str(CHART), "-f", str(variant), check=False)
        assert result.returncode == 0, variant.name + result.stdout + result.stderr


@pytest.mark.parametrize("variant", [None, *VARIANTS], ids=lambda v: v.name if v else "default")
def test_every_variant_renders_valid_hardened_manifests(tmp_path, variant):
    args = ["-f", str(variant)] if variant else []
    text = helm("template", "rel", str(CHART), *args).stdout
    validate(tmp_path, text, variant.stem if variant else "default")
    docs = [d for d in yaml.safe_load_all(text) if d]
    values = yaml.safe_load(variant.read_text()) if variant else {}

    for spec in pod_specs(docs):
        c = sidecar(spec)
        env = {e["name"]: e for e in c["env"]}
        # Secrets only ever by reference.
        for name in SECRET_SETTINGS & env.keys():
            assert "value" not in env[name], name
            assert "secretKeyRef" in env[name]["valueFrom"], name
        # The token API on loopback, the kubelet on the health port.
        assert env["AUTH_LISTEN"]["value"].startswith("127.0.0.1:")
        health_port = c["ports"][0]["containerPort"]
        assert [p["name"] for p in c["ports"]] == ["health"]
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            p = c[probe]
            if "grpc" in p:
                assert p["grpc"]["port"] == health_port
                service = p["grpc"]["service"]
            else:
                cmd = p["exec"]["command"]
                assert cmd[:2] == ["/usr/local/bin/auth-sidecar", "health"]
                assert cmd[cmd.index("--addr") + 1] == f"127.0.0.1:{health_port}"
                service = cmd[cmd.index("--service") + 1]
            assert service == ("readiness" if probe == "readinessProbe" else "liveness")
        # Hardened.
        sc = c["securityContext"]
        assert sc["runAsNonRoot"] is True
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"]["drop"] == ["ALL"]
        assert sc["seccompProfile"]["type"] == "RuntimeDefault"
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert c["resources"]["limits"]["memory"] and c["resources"]["requests"]["cpu"]
        assert env["TOKIO_WORKER_THREADS"]["valueFrom"]["resourceFieldRef"]["resource"] == "limits.cpu"

    # No ConfigMap carries a secret, and no Service reaches the token API.
    for cm in kinds(docs, "ConfigMap"):
        assert not SECRET_SETTINGS & set(cm.get("data", {})), cm["metadata"]["name"]
    for svc in kinds(docs, "Service"):
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] not in (API_PORT, "api", "grpc"), svc["metadata"]["name"]
            assert port.get("port") != API_PORT

    # The chart makes a Secret only when no existing one is named.
    existing = values.get("secrets", {}).get("existingSecret", "auth-sidecar")
    secrets = kinds(docs, "Secret")
    if existing:
        assert secrets == []
        refs = {e["valueFrom"]["secretKeyRef"]["name"] for spec in pod_specs(docs)
                for e in sidecar(spec)["env"] if "secretKeyRef" in e.get("valueFrom", {})}
        assert refs == {existing}
    replicas = values.get("replicas", 3)
    assert [d["spec"]["replicas"] for d in kinds(docs, "Deployment")] == [replicas]
    assert len(kinds(docs, "PodDisruptionBudget")) == (1 if replicas > 1 else 0)
    hooks = [p for p in kinds(docs, "Pod") if p["metadata"]["annotations"]["helm.sh/hook"] == "test"]
    assert len(hooks) == 1 and hooks[0]["spec"]["containers"][0]["args"][0] == "health"


def test_defaults_are_three_replicas_on_shared_storage_from_an_existing_secret():
    docs = render()
    [deployment] = kinds(docs, "Deployment")
    assert deployment["spec"]["replicas"] == 3
    env = {e["name"]: e for e in sidecar(pod_specs(docs)[0])["env"]}
    assert env["AUTH_STORAGE"]["value"] == "redis"
    assert env["AUTH_JWT_SECRET"]["valueFrom"]["secretKeyRef"]["name"] == "auth-sidecar"


@pytest.mark.parametrize("args, message", [
    (["--set", "sidecar.storage=memory"], "replicas: 3 with sidecar.storage: memory"),
    (["--set", "secrets.existingSecret=", "--set", "secrets.redisUrl=redis://r"],
     "same signing key on every pod"),
    (["--set", "secrets.existingSecret=", "--set", "secrets.jwtSecret=" + "s" * 32],
     "needs a Redis URL"),
    (["--set", "sidecar.storage=postgres", "--set", "secrets.existingSecret=",
      "--set", "secrets.jwtSecret=" + "s" * 32], "needs a PostgreSQL URL"),
    (["--set", "secrets.existingSecret=", "--set", "secrets.jwtSecret=" + "s" * 32,
      "--set", "secrets.redisUrl=redis://r", "--set", "mfa.enabled=true"],
     "mfa.enabled needs the same MFA key on every pod"),
    (["--set", "mfa.issuer=https://x"], "mfa.issuer: Does not match pattern"),
    (["--set", "sidecar.bogus=1"], "Additional property bogus is not allowed"),
    (["--set", "replicas=three"], "replicas: Invalid type"),
    (["--set", "sidecar.listen=0.0.0.0:50051"], "sidecar.listen: Does not match pattern"),
    (["--set", "sidecar.storage=etcd"], "sidecar.storage"),
])
def test_bad_values_fail_the_render_with_a_clear_message(args, message):
    result = helm("template", "rel", str(CHART), *args, check=False)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr


def test_tls_secrets_are_mounted_and_named_in_the_settings():
    docs = render("-f", str(CHART / "ci" / "tls-values.yaml"))
    [spec] = pod_specs(docs)
    container = sidecar(spec)
    env = {e["name"]: e for e in container["env"]}
    assert env["AUTH_REDIS_CA_FILE"]["value"] == "/etc/auth-sidecar/redis-tls/ca.crt"
    assert env["AUTH_REDIS_CLIENT_CERT"]["value"] == "/etc/auth-sidecar/redis-tls/tls.crt"
    assert env["AUTH_REDIS_CLIENT_KEY"]["value"] == "/etc/auth-sidecar/redis-tls/tls.key"
    assert env["AUTH_NODE_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert env["AUTH_STRICT_CLUSTER"]["value"] == "true"
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    for name, secret, path in [
        ("auth-sidecar-redis-tls", "redis-client-tls", "/etc/auth-sidecar/redis-tls"),
        ("auth-sidecar-postgres-tls", "postgres-ca", "/etc/auth-sidecar/postgres-tls"),
    ]:
        assert mounts[name]["mountPath"] == path and mounts[name]["readOnly"]
        assert volumes[name]["secret"]["secretName"] == secret
        assert volumes[name]["secret"]["defaultMode"] == 0o400
    # Without TLS values nothing is mounted.
    [plain] = pod_specs(render())
    assert "volumeMounts" not in sidecar(plain) and not plain.get("volumes")


def test_the_admin_ui_is_on_loopback_only_and_off_by_default():
    docs = render("-f", str(CHART / "ci" / "tls-values.yaml"))
    env = {e["name"]: e for e in sidecar(pod_specs(docs)[0])["env"]}
    assert env["AUTH_ADMIN_LISTEN"]["value"] == "127.0.0.1:8082"
    assert env["ADMIN_GUI_USERNAME"]["value"] == "admin"
    ref = env["ADMIN_GUI_PASSWORD_HASH"]["valueFrom"]["secretKeyRef"]
    assert ref["key"] == "ADMIN_GUI_PASSWORD_HASH"
    [secret] = kinds(docs, "Secret")
    assert "ADMIN_GUI_PASSWORD_HASH" in secret["data"]
    for service in kinds(docs, "Service"):
        assert all(p["port"] != 8082 for p in service["spec"]["ports"]), service
    assert all(p["containerPort"] != 8082 for p in sidecar(pod_specs(docs)[0])["ports"])
    env = {e["name"]: e for e in sidecar(pod_specs(render())[0])["env"]}
    assert env["AUTH_ADMIN_LISTEN"]["value"] == "off" and "ADMIN_GUI_PASSWORD_HASH" not in env


def test_mfa_is_off_unless_enabled_and_its_key_comes_from_the_secret():
    docs = render("-f", str(CHART / "ci" / "tls-values.yaml"))
    env = {e["name"]: e for e in sidecar(pod_specs(docs)[0])["env"]}
    assert env["AUTH_MFA"]["value"] == "on"
    ref = env["AUTH_MFA_KEY"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": "rel-auth-sidecar", "key": "AUTH_MFA_KEY"}
    [secret] = kinds(docs, "Secret")
    assert "AUTH_MFA_KEY" in secret["data"]
    assert env["AUTH_MFA_VERIFY_LIMIT"]["value"] == "5/1m:lockout=5m"
    env = {e["name"]: e for e in sidecar(pod_specs(render())[0])["env"]}
    assert env["AUTH_MFA"]["value"] == "off" and "AUTH_MFA_KEY" not in env


def test_hsm_module_and_pin_file_are_set_and_the_pin_is_a_mounted_file():
    docs = render("-f", str(CHART / "ci" / "hsm-values.yaml"))
    [spec] = pod_specs(docs)
    container = sidecar(spec)
    env = {e["name"]: e for e in container["env"]}
    assert env["CRYPTOKI_LIB"]["value"] == "/usr/lib/pkcs11/libvendor-pkcs11.so"
    assert env["PKCS11_PIN_FILE"]["value"] == "/etc/auth-sidecar/pkcs11/pin"
    assert "PKCS11_PIN" not in env, "the PIN itself never goes in the environment"
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert mounts["auth-sidecar-pkcs11-pin"]["mountPath"] == "/etc/auth-sidecar/pkcs11"
    volumes = {v["name"]: v for v in spec["volumes"]}
    secret = volumes["auth-sidecar-pkcs11-pin"]["secret"]
    assert secret["secretName"] == "hsm-pin" and secret["defaultMode"] == 0o400
    assert secret["items"] == [{"key": "pin", "path": "pin"}]
    env = {e["name"] for e in sidecar(pod_specs(render())[0])["env"]}
    assert not env & {"CRYPTOKI_LIB", "PKCS11_PIN_FILE"}


def test_kms_keys_run_as_a_service_account_annotated_for_irsa_and_none_by_default():
    docs = render("-f", str(CHART / "ci" / "kms-values.yaml"))
    [account] = kinds(docs, "ServiceAccount")
    assert account["metadata"]["name"] == "rel-auth-sidecar"
    assert account["metadata"]["annotations"] == {
        "eks.amazonaws.com/role-arn": "arn:aws:iam::111122223333:role/auth-sidecar-kms"}
    assert account["automountServiceAccountToken"] is False
    [spec] = pod_specs(docs)
    assert spec["serviceAccountName"] == "rel-auth-sidecar"
    assert spec["automountServiceAccountToken"] is False
    # An existing ServiceAccount, by name; and by default none is made or named.
    docs = render("--set", "serviceAccount.name=app-sa")
    assert not kinds(docs, "ServiceAccount")
    assert pod_specs(docs)[0]["serviceAccountName"] == "app-sa"
    docs = render()
    assert not kinds(docs, "ServiceAccount")
    assert "serviceAccountName" not in pod_specs(docs)[0]


def test_a_single_memory_replica_renders():
    docs = render("--set", "replicas=1", "--set", "sidecar.storage=memory")
    assert kinds(docs, "Deployment")[0]["spec"]["replicas"] == 1


def test_an_app_chart_embeds_the_sidecar_through_the_named_template(tmp_path):
    parent = tmp_path / "parent"
    shutil.copytree(ROOT / "tests" / "chart" / "parent", parent)
    chart_yaml = parent / "Chart.yaml"
    chart_yaml.write_text(chart_yaml.read_text().replace(
        "file://../../../charts/auth-sidecar", f"file://{CHART}"))
    helm("dependency", "update", str(parent))
    text = helm("template", "rel", str(parent)).stdout
    validate(tmp_path, text, "parent")
    docs = [d for d in yaml.safe_load_all(text) if d]
    [deployment] = kinds(docs, "Deployment")
    assert deployment["metadata"]["name"] == "rel-my-app", "only the app's own Deployment"
    spec = deployment["spec"]["template"]["spec"]
    assert [c["name"] for c in spec["containers"]] == ["my-app", "auth-sidecar"]
    env = {e["name"]: e for e in sidecar(spec)["env"]}
    assert env["DATABASE_URL"]["valueFrom"]["secretKeyRef"]["name"] == "my-app-secrets"
    assert sidecar(spec)["readinessProbe"]["grpc"]["service"] == "readiness"


def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint")
    assert hadolint, "hadolint not installed: run scripts/test"
    result = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
