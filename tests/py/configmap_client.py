"""The official Python client against skiff: create, list by label, patch and watch a ConfigMap."""
import sys
import threading
import time

from kubernetes import client, config, watch

config.load_kube_config(config_file=sys.argv[1])
v1 = client.CoreV1Api()
ns = "default"

cm = client.V1ConfigMap(metadata=client.V1ObjectMeta(name="py-cm", labels={"from": "python"}), data={"a": "1"})
created = v1.create_namespaced_config_map(ns, cm)
assert created.metadata.uid, "no uid"
v1.create_namespaced_config_map(ns, client.V1ConfigMap(metadata=client.V1ObjectMeta(name="other"), data={}))

listed = v1.list_namespaced_config_map(ns, label_selector="from=python")
names = [i.metadata.name for i in listed.items]
assert names == ["py-cm"], names

patched = v1.patch_namespaced_config_map("py-cm", ns, {"data": {"a": "2"}})
assert patched.data["a"] == "2", patched.data

seen = []


def later_patch():
    time.sleep(1)
    v1.patch_namespaced_config_map("py-cm", ns, {"data": {"a": "3"}})


threading.Thread(target=later_patch).start()
w = watch.Watch()
for ev in w.stream(v1.list_namespaced_config_map, ns, label_selector="from=python",
                   resource_version=patched.metadata.resource_version, timeout_seconds=20):
    seen.append((ev["type"], ev["object"].data["a"]))
    if ev["object"].data["a"] == "3":
        w.stop()
assert seen == [("MODIFIED", "3")], seen

try:
    v1.read_namespaced_config_map("missing", ns)
    raise AssertionError("expected 404")
except client.exceptions.ApiException as e:
    assert e.status == 404, e.status
print("python client ok")
